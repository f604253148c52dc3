"""Phantoms, datasets, training loops, evaluation and bundle export."""
