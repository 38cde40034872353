"""Where stage outputs live, relative to the project root (the working directory)."""
from pathlib import Path

PREPARED_DIR = Path("data/prepared")
TOKENIZER_DIR = Path("data/tokenizer")
TOKENIZER_FILE = TOKENIZER_DIR / "tokenizer.json"
TOKEN_STATS = TOKENIZER_DIR / "stats.csv"
OUTPUTS = Path("outputs")
TRAIN_INFO = OUTPUTS / "train.json"
METRICS = OUTPUTS / "metrics.json"
TRAIN_LOG = OUTPUTS / "train_log.csv"
LOSS_PLOT = OUTPUTS / "loss.png"
SAMPLES = OUTPUTS / "samples.txt"
REGISTERED = OUTPUTS / "registered.json"
