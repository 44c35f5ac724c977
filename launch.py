"""Sweep launcher: `python launch.py sweeps/rank_search.yaml [--address auto] [--resume] [--set k=v ...]`."""
from nbglm.sweep.runner import main

raise SystemExit(main())
