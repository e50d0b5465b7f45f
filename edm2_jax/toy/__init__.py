"""The 2-D toy of Karras et al. 2024 (toy2d-spec): the fractal Gaussian mixture with exact density and
score (`fractal`), the energy-MLP denoiser with keyed dropout (`model`), its training (`train`), the
guidance methods on it (`methods`), sample metrics (`metrics`) and figures (`plot`).

`edm2_jax.toy.mixture(classes)` returns the components of class 'A', 'B' or 'AB'.
"""
from edm2_jax.toy.fractal import Mixture, denoise, draw, log_prob, mixture, score

__all__ = ['Mixture', 'denoise', 'draw', 'log_prob', 'mixture', 'score']
