"""FLOPs per sampled image (`profiling.flops_per_image`, the study's FLOPs column) against XLA's count of
one plain forward pass, computed here directly: 2N − 1 forwards unguided; with a separate guide network,
each guided evaluation adds that network's forward; in-situ adds a second main forward; an interval
adds the guide only at the Heun evaluations inside it (counted here from the σ steps)."""
import jax
import numpy as np
import pytest

from edm2_jax import EDM2Config
from edm2_jax import methods as M
from edm2_jax import profiling
from edm2_jax import sampling as S
from helpers import random_network

STEPS = 4
EVALS = 2 * STEPS - 1
MAIN = EDM2Config(img_resolution=8, img_channels=2, label_dim=3, model_channels=16, channel_mult=(1, 2),
                  num_blocks=1, attn_resolutions=())
SMALL = MAIN.replace(model_channels=8)


def xla_forward_flops(net) -> float:
    """One forward of one image, counted by XLA on a function written here (the weights are an
    argument, as in the sampler, so their normalization is counted rather than folded away)."""
    inputs = S.network_inputs(net, [0])
    fn = jax.jit(lambda net, x, sigma, labels: net(x, sigma, labels))
    analysis = fn.lower(net, inputs.noise, np.float32(1.0), inputs.class_labels).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return float(analysis['flops'])


@pytest.fixture(scope='module')
def nets():
    return random_network(MAIN, 0), random_network(SMALL, 1)


def test_unguided_is_one_forward_per_evaluation(nets):
    net, _ = nets
    assert profiling.flops_per_image(net, (), STEPS) == pytest.approx(EVALS * xla_forward_flops(net), rel=1e-6)


def test_a_guide_network_adds_its_forward_at_every_guided_evaluation(nets):
    net, small = nets
    f, g = xla_forward_flops(net), xla_forward_flops(small)
    assert g < 0.5 * f
    flops = profiling.flops_per_image(net, M.terms('autoguidance', 1.0, guide=small), STEPS)
    assert flops == pytest.approx(EVALS * (f + g), rel=0.02)   # + the combination, a few FLOPs per pixel


@pytest.mark.parametrize('fusion', ['prefix', 'unfused'])
def test_insitu_costs_a_second_main_forward(nets, fusion):
    net, _ = nets
    flops = profiling.flops_per_image(net, M.terms('insitu', 1.0, 0.2, blocks='all'), STEPS, fusion=fusion)
    assert flops == pytest.approx(2 * EVALS * xla_forward_flops(net), rel=0.02)


def test_an_interval_counts_the_guide_only_inside_it(nets):
    net, small = nets
    lo, hi = 0.28, 5.42
    t = np.asarray(S.sigma_steps(STEPS), np.float32)
    sigmas = list(t[:STEPS]) + list(t[1:STEPS])          # the Euler evaluations, then the corrections
    inside = sum(np.float32(lo) < s <= np.float32(hi) for s in sigmas)
    assert 0 < inside < EVALS
    f, g = xla_forward_flops(net), xla_forward_flops(small)
    flops = profiling.flops_per_image(net, M.terms('autoguidance', 1.0, guide=small), STEPS, (lo, hi))
    assert flops == pytest.approx(EVALS * f + inside * g, rel=0.02)
