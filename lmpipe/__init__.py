"""lmpipe: train small GPT-style language models on your own text, with checkpoints you can trust.

Importing this package is cheap: no torch, MLflow or Prefect import happens here.
"""

__version__ = "0.1.0"
