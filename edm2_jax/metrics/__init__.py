"""Evaluation metrics: feature statistics and Fréchet distances in EDM2's protocol (edm2-spec §5)."""
