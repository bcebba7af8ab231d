"""CHAOST2 preprocessing command (see preprocess.py)."""
