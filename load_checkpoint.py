#!/usr/bin/env python3
"""The seed guide's workflow example runs `python3 load_checkpoint.py` from the project root: the
same script as scripts/load_checkpoint.py. See lmpipe/cli/seed.py."""
import sys

from lmpipe.cli.seed import main

if __name__ == "__main__":
    sys.exit(main("load_checkpoint"))
