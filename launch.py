"""`python launch.py sweeps/rank_search.yaml [--address auto] [--resume] [--set k=v ...]` = `nbglm sweep ...`."""
import sys

from nbglm.cli import main

raise SystemExit(main(["sweep", *sys.argv[1:]]))
