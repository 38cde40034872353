#!/usr/bin/env python3
"""The seed guide's `python3 training.py`: the whole lmpipe pipeline (`lmpipe run`), configured by
params.yaml and ENABLE_CHECKPOINTS, CHECKPOINT_INTERVAL, CHECKPOINT_DIR, MODEL_TYPE, TRAINING_STEPS,
TRAINING_DATA_SOURCE. See lmpipe/cli/seed.py."""
import sys

from lmpipe.cli.seed import main

if __name__ == "__main__":
    sys.exit(main("training"))
