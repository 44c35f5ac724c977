"""`python -m nbglm ...` is the same as the `nbglm` command."""

import sys

from nbglm.cli import main

sys.exit(main())
