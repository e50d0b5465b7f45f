"""The fastest correct XLA backend settings, chosen when `edm2_jax` is imported (before JAX starts its
backend), for every entry point: the library, the CLIs and the tests alike.

XLA:CPU in jaxlib 0.10 runs convolutions through YNNPACK, which on EDM2's 3×3 convolutions is about
2× slower than Eigen (measured: see docs/performance.md); keeping YNNPACK for dot products only
restores Eigen convolutions. Other jaxlib versions are left as they are (the option may not exist
there). Override with EDM2_JAX_CPU_CONVOLUTIONS=default (XLA's choice) or =eigen; an explicit
XLA_FLAGS setting of the same option always wins. Accelerators are unaffected.
"""
from __future__ import annotations

import os

ENV = 'EDM2_JAX_CPU_CONVOLUTIONS'
CHOICES = ('auto', 'eigen', 'default')
EIGEN_FLAG = '--xla_cpu_experimental_ynn_fusion_type=individual_dot'
EIGEN_VERSIONS = ('0.10.',)  # jaxlib versions measured faster with Eigen convolutions


def cpu_convolutions(jaxlib_version: str, choice: str, xla_flags: str) -> str:
    """'eigen' or 'default': the XLA:CPU convolution path for this jaxlib and setting."""
    if choice not in CHOICES:
        raise ValueError(f'{ENV} must be one of {CHOICES}, got {choice!r}')
    if 'ynn_fusion_type' in xla_flags:
        return 'eigen' if EIGEN_FLAG in xla_flags else 'default'  # the user's XLA_FLAGS decide
    if choice == 'auto':
        return 'eigen' if jaxlib_version.startswith(EIGEN_VERSIONS) else 'default'
    return choice


def configure() -> str:
    """Sets XLA_FLAGS for the chosen convolution path; returns the path in effect (XLA's default
    when JAX's backend started before edm2_jax was imported: its flags are read only at start)."""
    import jaxlib.version
    from jax._src import xla_bridge
    flags = os.environ.get('XLA_FLAGS', '')
    if xla_bridge.backends_are_initialized():
        return 'eigen' if EIGEN_FLAG in flags else 'default'
    choice = cpu_convolutions(jaxlib.version.__version__, os.environ.get(ENV, 'auto'), flags)
    if choice == 'eigen' and EIGEN_FLAG not in flags:
        os.environ['XLA_FLAGS'] = f'{flags} {EIGEN_FLAG}'.strip()
    return choice


CHOSEN = configure()


def describe() -> dict:
    """What the run uses (for summaries): backend, device kind, the CPU convolution path."""
    import jax
    device = jax.devices()[0]
    return {'platform': device.platform, 'device_kind': device.device_kind,
            'cpu_convolutions': CHOSEN if device.platform == 'cpu' else None,
            'jax': jax.__version__}
