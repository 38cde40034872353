#!/usr/bin/env python3
"""The seed guide's
`CHECKPOINT_PATH=... TRAINING_DATA_SOURCE=new_data.md python3 training_resume.py`
("implementation coming" there): resume training from a checkpoint, on new data if given
(`lmpipe resume`). See lmpipe/cli/seed.py."""
import sys

from lmpipe.cli.seed import main

if __name__ == "__main__":
    sys.exit(main("training_resume"))
