"""CMR preprocessing command (see preprocess.py)."""
