"""Leaf helpers every layer may use: files, hashing, CPUs, progress, sizes."""
