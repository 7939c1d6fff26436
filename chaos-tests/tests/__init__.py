"""Tests of the chaos harness: `cd chaos-tests && python3 -m unittest` (or, from the repository
root, `python3 -m unittest discover -s chaos-tests -t chaos-tests`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
