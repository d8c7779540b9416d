"""The sweep tests import their helpers (the fake runner and worker, the checks) from this directory."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
