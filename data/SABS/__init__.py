"""SABS preprocessing command (see preprocess.py)."""
