"""Synthetic corpus and training loop that produce the bundled checkpoint."""
