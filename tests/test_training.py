"""EDM2 image training (edm2-spec §6, §6.1): loss, lr schedule, EMA β, forced weight normalisation
against independent numpy/closed-form values; a tiny net that learns, resumes bit-identically, gives
the same result on 2 simulated devices, and whose post-hoc EMA matches a directly tracked one."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edm2_jax import checkpoint
from edm2_jax import train_state as S
from edm2_jax import training as T
from helpers import TRAIN_CFG as CFG, TRAIN_NET as NET, train_batch as batch, train_start_state as start_state

ROOT = Path(__file__).resolve().parents[1]
def run(state, steps, start=0, fixed=False, run_dir=None):
    """`steps` training steps from global step `start`; snapshots into run_dir when due."""
    step_fn = T.make_train_step(state.config)
    losses = []
    for k in range(start, start + steps):
        before = state.images_seen
        state, metrics = step_fn(state, *batch(k, fixed))
        losses.append(float(metrics['loss']))
        if run_dir is not None and T.crossed(before, state.images_seen, state.config.snapshot_every):
            S.save_snapshot(run_dir, state)
    return state, np.array(losses)


def leaves_equal(a, b):
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b))
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in pairs)


# 2 simulated devices vs 1 in a subprocess (XLA fixes the device count at start-up), started at import
# so that it runs while the in-process tests do.
_TWO_DEVICE_SCRIPT = r'''
import json, sys
import jax, numpy as np
sys.path.insert(0, "tests")
from helpers import TRAIN_CFG as CFG, train_batch as batch, train_start_state as start_state
from edm2_jax import parallel, training as T
assert jax.device_count() == 2
mesh = parallel.data_mesh()
state = start_state(CFG, mesh)
step = T.make_train_step(CFG, mesh)
losses, out = [], {}
for k in range(3):
    state, m = step(state, *batch(k))
    losses.append(float(m["loss"]))
    if k == 0:
        out.update({f"mu_{i}": np.asarray(a) for i, a in enumerate(jax.tree.leaves(state.opt_state[1].mu))})
assert all(a.sharding.is_fully_replicated for a in jax.tree.leaves(state))
out.update({f"param_{i}": np.asarray(a) for i, a in enumerate(jax.tree.leaves(state.params))})
np.savez(sys.argv[1], losses=np.array(losses), **out)
try:
    T.make_train_step(CFG.replace(batch_size=3), mesh)(state, *(a[:3] for a in batch(0)))
    raise AssertionError("odd batch accepted")
except ValueError as e:
    assert "divisible" in str(e), e
bf = start_state(CFG.replace(compute_dtype="bfloat16"))
bf, m = T.make_train_step(bf.config)(bf, *batch(0))
print(json.dumps({"bf16_loss": float(m["loss"]),
                  "bf16_param_dtypes": sorted({str(a.dtype) for a in jax.tree.leaves(bf.params)})}))
'''


@pytest.fixture(scope='module')
def two_device_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('two_dev') / 'result.npz'
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=2'
                        ' --xla_backend_optimization_level=0').strip()
    proc = subprocess.Popen([sys.executable, '-c', _TWO_DEVICE_SCRIPT, str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    yield proc, out
    if proc.poll() is None:
        proc.kill()


@pytest.fixture(scope='module', autouse=True)
def _start_two_device_run(request):
    """Starts the subprocess with the module's first test, if its test is selected (not under -m "not slow")."""
    if any(item.name == 'test_two_devices_match_one_device' for item in request.session.items):
        request.getfixturevalue('two_device_run')


# ---------------------------------------------------------------------------------------------------
# Formulas.

def test_edm2_loss_matches_numpy():
    """Per image: Σ over elements of λ(σ)/e^u (D − y)² + u with λ = (σ² + σd²)/(σ σd)² (spec §6)."""
    rng = np.random.default_rng(0)
    D, y = rng.normal(size=(2, 4, 3, 3, 2))
    sigma = np.array([0.05, 0.7, 3.0, 40.0])
    u = np.array([-1.5, 0.0, 0.3, 2.0])
    lam = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
    ref = np.array([np.sum(lam[i] / np.exp(u[i]) * (D[i] - y[i]) ** 2 + u[i]) for i in range(4)])
    got = T.edm2_loss(jnp.asarray(D, jnp.float32), jnp.asarray(y, jnp.float32), jnp.asarray(sigma, jnp.float32),
                      jnp.asarray(u, jnp.float32).reshape(4, 1, 1, 1), 0.5)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=2e-6)
    # The toy's denoiser_loss is the same objective averaged over the 18 elements instead of summed.
    toy = T.denoiser_loss(jnp.asarray(D), jnp.asarray(y), T.edm_weight(jnp.asarray(sigma), 0.5), jnp.asarray(u))
    np.testing.assert_allclose(18 * float(toy), ref.mean(), rtol=2e-6)


def test_edm2_lr_spec_values():
    """α_ref / sqrt(max(t/t_d, 1)) · min(t/t_w, 1), t in images; t_d = 70000·2048, t_w = 10 M (spec §6)."""
    cfg = T.TrainConfig(NET, lr_ref=0.01, lr_decay_images=70000 * 2048, lr_warmup_images=10_000_000)
    lr = T.edm2_lr(cfg)
    decay = 70000 * 2048
    ts = [0, 2_500_000, 5_000_000, 10_000_000, 0.5 * decay, decay, 4 * decay, 16 * decay]
    want = [0.0, 0.0025, 0.005, 0.01, 0.01, 0.01, 0.005, 0.0025]
    np.testing.assert_allclose([float(lr(t)) for t in ts], want, rtol=1e-6, atol=1e-12)
    no_warmup = T.edm2_lr(cfg.replace(lr_warmup_images=0))
    np.testing.assert_allclose([float(no_warmup(t)) for t in (0, 5_000_000, 2 * decay)],
                               [0.01, 0.01, 0.01 / np.sqrt(2)], rtol=1e-6)


@pytest.mark.parametrize('sigma_rel, gamma', [(0.050, 16.9722), (0.075, 10.2891), (0.100, 6.9372)])
def test_ema_beta_spec_values(sigma_rel, gamma):
    """β = (1 − Δ/t)^(γ+1) at the spec's γ check values, float64 reference; 0 at the first step, and
    1 − β accurate to 1e-4 relative even at EDM2 scale (t ≈ 2³¹ images, Δ = 2048)."""
    from edm2_jax.ema import power_beta, sigma_rel_to_gamma
    g = sigma_rel_to_gamma(sigma_rel)
    assert abs(g - gamma) < 1e-3
    delta = 2048
    for steps in (1, 2, 10, 1000, 999_999, 1 << 20):
        t = steps * delta
        ref = (1 - delta / t) ** (gamma + 1)
        got = float(power_beta(jnp.float32(t), delta, g))
        assert abs((1 - got) - (1 - ref)) <= 1e-4 * (1 - ref) + 1e-7, (steps, got, ref)
    assert float(power_beta(jnp.float32(delta), delta, g)) == 0.0


def test_adam_zeroes_nonfinite_gradients():
    """NaN/±Inf gradient entries count as 0 (EDM2's nan_to_num); the rest get the usual first Adam step
    m̂/(√v̂ + eps) = g/(|g| + 1e-8) (bias-corrected, β = (0.9, 0.99))."""
    g = {'w': jnp.array([0.5, jnp.nan, jnp.inf, -jnp.inf, -2e-8])}
    opt = T.scale_by_adam()
    updates, _ = opt.update(g, opt.init(g))
    want = np.array([0.5 / (0.5 + 1e-8), 0.0, 0.0, 0.0, -2e-8 / (2e-8 + 1e-8)])
    np.testing.assert_allclose(np.asarray(updates['w']), want, rtol=1e-5)


def test_forced_weight_norm_unit_rms_rows():
    params = jax.device_get(T.init_train_state(CFG, jax.random.key(1)).params)
    params = jax.tree_util.tree_map_with_path(  # non-zero gains (init has 0) and a badly scaled weight
        lambda p, v: np.full_like(v, 0.7) if p[-1].key.endswith('_gain') else 3.0 * v, params)
    normed = jax.device_get(jax.jit(T.forced_weight_norm)(params))
    flat_in, flat_out = (jax.tree_util.tree_flatten_with_path(t)[0] for t in (params, normed))
    weights = 0
    for (path, w), (_, v) in zip(flat_in, flat_out):
        if path[-1].key == 'weight':
            weights += 1
            w2 = w.reshape(-1, w.shape[-1]).astype(np.float64)   # fan-in × out (HWIO / [in, out])
            rms = np.sqrt(np.mean(w2 ** 2, axis=0))
            np.testing.assert_allclose(v.reshape(w2.shape), w2 / (1e-4 + rms), rtol=1e-6, atol=1e-7)
            row_rms = np.sqrt(np.mean(v.reshape(w2.shape).astype(np.float64) ** 2, axis=0))
            np.testing.assert_allclose(row_rms, 1.0, atol=1e-4)
        else:
            np.testing.assert_array_equal(v, w)
    assert weights >= 10


def test_config_roundtrip_and_validation():
    d = json.loads(json.dumps(CFG.to_dict()))
    assert T.TrainConfig.from_dict(d) == CFG
    assert CFG.trained_network.dropout == 0.1 and CFG.network.dropout == 0.0
    for bad in (dict(batch_size=0), dict(dropout=1.0), dict(compute_dtype='float16'), dict(ema_sigma_rels=(0.5,)),
                dict(network=NET.replace(dropout=0.2))):
        with pytest.raises(ValueError):
            CFG.replace(**bad)
    with pytest.raises(ValueError, match='unknown TrainConfig fields'):
        T.TrainConfig.from_dict({**d, 'lr': 1})
    with pytest.raises(ValueError, match=r"unknown EDM2Config fields: \['model_chans'\]"):
        T.TrainConfig.from_dict({**d, 'network': {**d['network'], 'model_chans': 8}})


def test_step_rejects_bad_batches():
    state = T.init_train_state(CFG, jax.random.key(0))
    step = T.make_train_step(CFG)
    images, labels, ids = batch(0)
    with pytest.raises(ValueError, match='images'):
        step(state, images[:4], labels, ids)
    with pytest.raises(ValueError, match='labels'):
        step(state, images, labels[:, :2], ids)
    with pytest.raises(ValueError, match='example_ids'):
        step(state, images, labels, ids[:3])


# ---------------------------------------------------------------------------------------------------
# Training runs.

def test_loss_decreases_and_randomness_is_per_example():
    _, losses = run(start_state(), 30, fixed=True)
    assert np.isfinite(losses).all()
    assert losses[-5:].mean() < 0.7 * losses[:5].mean(), losses
    # Same examples (rows + ids) in another order: same σ, noise and dropout per example → same loss.
    step = T.make_train_step(CFG)
    images, labels, ids = batch(7)
    perm = np.array([5, 2, 7, 0, 1, 6, 3, 4])
    s1, m1 = step(start_state(), images, labels, ids)
    s2, m2 = step(start_state(), images[perm], labels[perm], ids[perm])
    np.testing.assert_allclose(float(m2['loss']), float(m1['loss']), rtol=1e-6)
    _, m3 = step(start_state(), images, labels, ids + 8)
    assert abs(float(m3['loss']) - float(m1['loss'])) > 1e-3 * float(m1['loss'])  # other ids, other noise


def test_save_restore_and_resume_bit_identical(tmp_path):
    full, full_losses = run(start_state(), 6)
    part, losses_a = run(start_state(), 3)
    kept = jax.device_get(part)
    S.save_state(tmp_path, part, {'data_position': 24})
    restored, extra = S.latest_state(tmp_path, T.abstract_train_state(CFG))
    assert extra == {'data_position': 24} and int(restored.step) == 3 and restored.images_seen == 24
    assert leaves_equal(restored, kept)
    resumed, losses_b = run(restored, 3, start=3)
    assert leaves_equal(resumed, full)
    np.testing.assert_array_equal(np.concatenate([losses_a, losses_b]), full_losses)
    # keep the newest two; a changed network config is refused; duration may change
    for k in range(2):
        S.save_state(tmp_path, resumed.replace(step=resumed.step + k), {})
    assert sorted(p.name for p in tmp_path.glob('state-*')) == ['state-000000006', 'state-000000007']
    assert not list(tmp_path.glob('.*'))
    assert S.latest_state(tmp_path, T.abstract_train_state(CFG.replace(duration=10 ** 6)))[0].images_seen == 56
    with pytest.raises(ValueError, match='network'):
        S.latest_state(tmp_path, T.abstract_train_state(CFG.replace(network=NET.replace(model_channels=16))))
    assert S.latest_state(tmp_path / 'empty', T.abstract_train_state(CFG)) is None


def test_posthoc_reconstruction_matches_tracked_ema(tmp_path):
    """Track σ_rel 0.05, 0.075, 0.10 for 200 steps with snapshots every 5 steps; reconstruct 0.075 from
    the 0.05/0.10 snapshots alone (spec §6.1 independent check) and compare with the tracked one."""
    state, _ = run(start_state(), 200, run_dir=tmp_path)
    snaps = S.list_snapshots(tmp_path)
    assert len(snaps) == 3 * 40 and snaps[-1].t == 1600
    for s in snaps:
        if s.sigma_rel == 0.075:
            s.path.unlink()
    net = S.reconstruct_phema(tmp_path, [0.075])[0.075]
    tracked = jax.tree.leaves(jax.device_get(state.ema.get(0.075)))
    other = jax.tree.leaves(jax.device_get(state.ema.get(0.05)))
    recon = jax.tree.leaves(net.variables['params'])
    vec = lambda leaves: np.concatenate([np.ravel(a).astype(np.float64) for a in leaves])  # noqa: E731
    err = np.linalg.norm(vec(recon) - vec(tracked))
    rel = err / np.linalg.norm(vec(tracked))
    to_neighbour = err / np.linalg.norm(vec(other) - vec(tracked))
    print(f'post-hoc 0.075: relative error {rel:.2e}, {to_neighbour:.2e} of the 0.05–0.075 distance')
    assert rel < 1e-5 and to_neighbour < 1e-3
    # A tracked profile at a snapshot time is reproduced from its own snapshot (x = unit vector).
    direct = S.reconstruct_phema(tmp_path, [0.05])[0.05]
    assert max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(direct.variables['params']), other)) < 1e-6
    # Exported: a checkpoint.load-able network recording the trained dropout rate.
    S.export_network(tmp_path, tmp_path / 'net-0.075', sigma_rel=0.075)
    loaded = checkpoint.load(tmp_path / 'net-0.075')
    assert loaded.config == CFG.trained_network and loaded.config.dropout == 0.1
    assert leaves_equal(loaded.variables['params'], net.variables['params'])
    with pytest.raises(ValueError, match='snapshot time'):
        S.reconstruct_phema(tmp_path, [0.075], t=1234)


@pytest.mark.slow
def test_two_devices_match_one_device(two_device_run):
    """3 steps on a 2-device mesh (batch sharded, shard_map + psum) vs one device. The per-example σ,
    noise and dropout are the same; only the sums over the batch are split differently, so the
    first-step gradient (Adam's μ = 0.1·g) agrees to float32 rounding. Adam then divides by √ν, which
    turns rounding-level differences of near-zero gradient entries into O(lr) parameter differences:
    we allow 0.1·lr and print the same effect measured on one device with the batch rows permuted."""
    proc, out = two_device_run
    stdout, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, stdout[-3000:]
    info = json.loads(stdout.strip().splitlines()[-1])
    two = np.load(out)
    step = T.make_train_step(CFG)
    state, m = step(start_state(), *batch(0))
    mu = jax.tree.leaves(jax.device_get(state.opt_state[1].mu))
    scale = max(np.abs(a).max() for a in mu)
    mu_err = max(np.abs(two[f'mu_{i}'] - a).max() for i, a in enumerate(mu))
    one, losses = run(state, 2, start=1)
    losses = np.concatenate([[float(m['loss'])], losses])
    np.testing.assert_allclose(two['losses'], losses, rtol=1e-5)
    params = jax.tree.leaves(jax.device_get(one.params))
    err = max(np.abs(two[f'param_{i}'] - a).max() for i, a in enumerate(params))
    perm = np.array([5, 2, 7, 0, 1, 6, 3, 4])
    permuted = start_state()
    for k in range(3):
        permuted, _ = step(permuted, *(a[perm] for a in batch(k)))
    perm_err = max(np.abs(np.asarray(b) - a).max() for a, b in zip(params, jax.tree.leaves(permuted.params)))
    print(f'2 vs 1 device: gradient max |Δ| {mu_err / 0.1:.2e} (max |g| {scale / 0.1:.2e}); after 3 steps '
          f'max |Δθ| {err:.2e} (1 device, permuted rows: {perm_err:.2e}); losses rel '
          f'{np.abs(two["losses"] / losses - 1).max():.1e}')
    assert mu_err <= 1e-5 * scale
    assert err < 0.1 * CFG.lr_ref
    assert info['bf16_param_dtypes'] == ['float32'] and abs(info['bf16_loss'] / losses[0] - 1) < 0.02
