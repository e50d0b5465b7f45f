"""edm2-jax: EDM2 diffusion models in JAX/Flax, guided by degraded copies of themselves."""
from edm2_jax import backend  # first: XLA flags are read when JAX starts its backend
from edm2_jax import guidance, methods, perturb, rules  # noqa: E402
from edm2_jax.config import PRESETS, EDM2Config, block_specs, get_preset
from edm2_jax.guidance import Interval, Schedule, Term
from edm2_jax.network import Network
from edm2_jax.sampling import (heun_loop, heun_sampler, network_inputs, sample, seed_inputs, seed_keys,
                               sigma_steps)

__all__ = ['EDM2Config', 'Interval', 'Network', 'PRESETS', 'Schedule', 'Term', 'backend', 'block_specs',
           'get_preset', 'guidance', 'heun_loop', 'heun_sampler', 'methods', 'network_inputs', 'perturb', 'rules',
           'sample', 'seed_inputs', 'seed_keys', 'sigma_steps']
