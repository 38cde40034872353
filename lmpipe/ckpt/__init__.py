"""Checkpoints: the format and its files, the manifest, safe loading, other trainers' formats,
list/inspect/diff, verify, doctor, import/export. Knows nothing of training."""
