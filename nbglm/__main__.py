"""`python -m nbglm ...` is the same as the `nbglm` command."""

from nbglm.cli import process

process()
