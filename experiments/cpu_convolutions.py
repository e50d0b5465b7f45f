"""XLA:CPU convolution backend for the CPU-bound scripts (train, study).

jaxlib 0.10's XLA:CPU runs convolutions through YNNPACK, which on the small Fashion-MNIST networks is
~2× slower than Eigen: weight-gradient convolutions per training step, and the sampler's forward
passes (8 Heun steps of in-situ guidance on 250 16×16 images: 27.6 s vs 13.6 s, 2-core container).
Keeping YNNPACK for dots only restores Eigen convolutions. The flag must be set before JAX
initialises its backend; an explicit XLA_FLAGS setting of the same option wins, and other jaxlib
versions (which may not know the option) are left alone.
"""
from __future__ import annotations

import os

CPU_CONV_FLAG = '--xla_cpu_experimental_ynn_fusion_type=individual_dot'


def use_eigen_convolutions() -> None:
    import jaxlib.version
    current = os.environ.get('XLA_FLAGS', '')
    if jaxlib.version.__version__.startswith('0.10.') and 'ynn_fusion_type' not in current:
        os.environ['XLA_FLAGS'] = f'{current} {CPU_CONV_FLAG}'.strip()
