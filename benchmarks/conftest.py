"""pytest-benchmark setup: `pytest benchmarks/ --benchmark-only` from the repository root.

The main test run (`python -m pytest`, testpaths = ["tests"]) never collects this directory.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
