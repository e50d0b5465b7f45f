"""Helpers shared by the test modules (plain functions and classes; the fixtures are in conftest.py,
which re-exports these names). Test modules import from here, never from each other."""
import functools
import os
import sys
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from edm2_jax import training as T
from edm2_jax.config import EDM2Config

# ---------------------------------------------------------------------------------------------------
# Layouts and reference data.


def torch_params(npz, prefix='param/'):
    """The torch-named state_dict stored under `prefix` in a reference .npz."""
    return {k[len(prefix):]: npz[k] for k in npz if k.startswith(prefix)}


def nchw_to_nhwc(a):
    return np.asarray(a).transpose(0, 2, 3, 1)


def nhwc_to_nchw(a):
    return np.asarray(a).transpose(0, 3, 1, 2)


def rel_err(a, b):
    """max |a − b| relative to max |b|."""
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


# ---------------------------------------------------------------------------------------------------
# Tiny networks.


def random_network(config, seed=0, gains=(0.5, 1.5)):
    """`Network.random`: random weights, non-zero gains, so every block and the output depend on the
    input (a fresh EDM2 net has zero gains and outputs F = 0)."""
    from edm2_jax import Network
    return Network.random(config, seed, gains=gains)


def write_tiny_checkpoint(path, *, nan=False, channels=3):
    """A tiny conditional pixel-space network (random, non-zero gains) saved as a converted checkpoint;
    nan=True poisons the output gain so every sample is NaN."""
    from edm2_jax import checkpoint
    from edm2_jax.config import EDM2Config
    config = EDM2Config(img_resolution=8, img_channels=channels, label_dim=10, model_channels=16,
                        channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,))
    net = random_network(config, seed=0)
    if nan:
        params = jax.tree_util.tree_map_with_path(
            lambda path, v: np.float32(np.nan) if path[-1].key == 'out_gain' else v, net.variables['params'])
        net = net.replace(variables={**net.variables, 'params': params})
    checkpoint.save(path, net, decoder={'type': 'rgb'})
    return path


def toy_trained_like(c, seed):
    """Toy-model parameters with the zero-initialised output gain set to 0.7, as after training."""
    from edm2_jax.toy import model as T
    return {**T.init(c, jax.random.key(seed)), 'gain': jnp.float32(0.7)}


# ---------------------------------------------------------------------------------------------------
# A tiny training run (test_training.py, in process and in its 2-device subprocess).

TRAIN_NET = EDM2Config(img_resolution=8, img_channels=1, label_dim=3, model_channels=8, channel_mult=(1, 2),
                       num_blocks=1, attn_resolutions=(4,), channels_per_head=8, logvar_channels=8)
TRAIN_CFG = T.TrainConfig(TRAIN_NET, batch_size=8, duration=8 * 400, lr_ref=0.01, lr_decay_images=8 * 100,
                          lr_warmup_images=0, dropout=0.1, ema_sigma_rels=(0.05, 0.075, 0.10),
                          snapshot_every=8 * 5, checkpoint_every=8 * 50, seed=3)


def train_batch(step, fixed=False):
    """A deterministic batch for `step`: 8 images in [-1, 1], one-hot labels, global example ids."""
    rng = np.random.default_rng(0 if fixed else step + 1)
    images = np.tanh(rng.normal(size=(8, 8, 8, 1)) + np.linspace(-1, 1, 8)[None, :, None, None]).astype(np.float32)
    labels = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 8)]
    ids = np.arange(8) + (0 if fixed else 8 * step)
    return images, labels, ids


@functools.partial(jax.jit, static_argnames='n_ema')
def _with_gains(params, n_ema):
    params = jax.tree_util.tree_map_with_path(
        lambda p, v: jnp.full_like(v, 0.5) if p[-1].key.endswith('_gain') else v, params)
    return params, tuple(jax.tree.map(lambda a: a + 0, params) for _ in range(n_ema))


def train_start_state(cfg=TRAIN_CFG, mesh=None):
    """The initial state with the zero-initialised gains set to 0.5, so that from the first step every
    weight gets a gradient (a fresh EDM2 net outputs F = 0)."""
    state = T.init_train_state(cfg, jax.random.key(0))
    params, averages = _with_gains(state.params, n_ema=len(state.ema.averages))
    state = state.replace(params=params, ema=state.ema._replace(averages=averages))
    if mesh is not None:
        state = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    return state


# ---------------------------------------------------------------------------------------------------
# Counting network evaluations.

CALLS = []   # (name, σ, rows) of every network evaluation, in execution order (see run_recorded)
TRACES = []  # one entry per traced network call (grows only when something is compiled)


@flax.struct.dataclass
class Recorded:
    """A Network that logs each evaluation it runs (a debug callback, so at run time and in order):
    (name, σ, rows of x) with name `net` or `net.stacked<copies>`."""
    net: Any
    name: str = flax.struct.field(pytree_node=False)

    @property
    def config(self):
        return self.net.config

    def _log(self, kind, x, sigma):
        TRACES.append(kind)
        n = x.shape[0]
        jax.debug.callback(lambda s: CALLS.append((kind, float(s), n)), sigma, ordered=True)

    def __call__(self, x, sigma, class_labels=None, **kwargs):
        self._log(self.name, x, sigma)
        return self.net(x, sigma, class_labels, **kwargs)

    def stacked(self, x, sigma, class_labels=None, *, copies, **kwargs):
        self._log(f'{self.name}.stacked{copies}', x, sigma)
        return self.net.stacked(x, sigma, class_labels, copies=copies, **kwargs)


def run_recorded(fn):
    """fn()'s result as NumPy and the evaluations it ran."""
    CALLS.clear()
    out = np.asarray(fn())
    jax.effects_barrier()
    return out, list(CALLS)


# ---------------------------------------------------------------------------------------------------
# The Heun sampler, independently in NumPy.


def numpy_heun(denoise, noise, t, eps=None, gammas=None):
    """EDM's stochastic Heun sampler (Karras et al. 2022, Algorithm 2; edm2-spec §3.1) as a plain
    float64 loop over the σ steps t (t[-1] = 0). denoise(x, σ, i) is D at step i; eps[i] is the churn
    noise of step i and gammas[i] its churn factor."""
    x = np.asarray(noise, np.float64) * t[0]
    n = len(t) - 1
    for i in range(n):
        gamma = 0.0 if gammas is None else gammas[i]
        t_hat = t[i] + gamma * t[i]
        x_hat = x + np.sqrt(t_hat ** 2 - t[i] ** 2) * eps[i] if gamma > 0 else x
        d = (x_hat - denoise(x_hat, t_hat, i)) / t_hat
        x = x_hat + (t[i + 1] - t_hat) * d
        if i < n - 1:
            x = x_hat + (t[i + 1] - t_hat) * (d + (x - denoise(x, t[i + 1], i)) / t[i + 1]) / 2
    return x


def heun_evals(num_steps, sigma_max=80.0):
    """(σ, step) of every denoiser evaluation of the Heun loop over EDM2's σ steps, in order: step i
    evaluates at t_i, and again at t_{i+1} unless it is the last step."""
    from edm2_jax import sampling
    t = np.asarray(sampling.sigma_steps(num_steps, sigma_max=sigma_max), np.float64)
    return [(s, i) for i in range(num_steps) for s in ([t[i], t[i + 1]] if i < num_steps - 1 else [t[i]])]


STEPS = 4            # sampler steps of the guidance tests on the micro network
SAMPLER_RTOL = 1e-4  # fused vs unfused, batch sizes: XLA CPU's conv/GEMM summation order depends on the
#                      batch size (~1 ulp per network evaluation), which the sampler carries along
MICRO_CONFIG = dict(img_resolution=8, img_channels=2, label_dim=3, model_channels=16, channel_mult=(1,),
                    num_blocks=1, attn_resolutions=())


def assert_close(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert np.abs(a - b).max() <= SAMPLER_RTOL * np.abs(b).max(), (np.abs(a - b).max(), np.abs(b).max())


ROOT = Path(__file__).resolve().parents[1]


def cpu_env(**extra):
    """The environment of a CLI subprocess: CPU only, the suite's fast compile setting."""
    env = dict(os.environ, JAX_PLATFORMS='cpu', **extra)
    env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' --xla_backend_optimization_level=0').strip()
    return env


def generate_cmd(*args):
    return [sys.executable, '-m', 'experiments.generate', *args]
