"""Converters from PyTorch/NVIDIA checkpoints to edm2-jax checkpoints (the only place torch may appear)."""
