"""Make tests/unit importable, so test files in any sub-folder can write
``from dist_harness import run_distributed`` (pytest only puts the test file's own
folder on sys.path)."""
import os
import sys

_UNIT_DIR = os.path.dirname(os.path.abspath(__file__))
if _UNIT_DIR not in sys.path:
    sys.path.insert(0, _UNIT_DIR)
