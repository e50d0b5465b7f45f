"""edm2-jax: EDM2 diffusion models in JAX/Flax, guided by degraded copies of themselves."""
from edm2_jax.config import PRESETS, EDM2Config, block_specs, get_preset
from edm2_jax.network import Network

__all__ = ['EDM2Config', 'Network', 'PRESETS', 'block_specs', 'get_preset']
