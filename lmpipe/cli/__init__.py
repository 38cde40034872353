"""The command line: `lmpipe` (main.py), `lmpipe ckpt` (ckpt.py) and the seed guide's scripts'
environment interface (seed.py). Nothing else in the project imports this package."""
from lmpipe.cli.main import main

__all__ = ["main"]
