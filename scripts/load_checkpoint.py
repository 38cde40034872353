#!/usr/bin/env python3
"""The seed guide's `python3 scripts/load_checkpoint.py`; `--help` shows its variables
(lmpipe/cli/seed.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project root, for `lmpipe`

from lmpipe.cli.seed import main

if __name__ == "__main__":
    sys.exit(main("load_checkpoint"))
