"""Evaluation metrics: feature statistics and Fréchet distances in EDM2's protocol (spec §5)."""
