"""The default demo's bundled models (experiments/toy2d_models) are the ones its settings ask for, so
`make demo` samples at once instead of training; a changed setting trains instead of loading them. The
main model comes with its run's EMA snapshots, from which the history guides are made."""
import jax
import numpy as np

from edm2_jax.toy import model as toy_model


def test_bundled_models_match_the_demo():
    from experiments import toy2d
    specs = toy2d.model_specs(toy2d.DEMO, 0.0)
    assert set(specs) == {'main', 'ag', 'cfg'}
    for name, spec in specs.items():
        bundled = toy2d._bundled(name, 0, spec)
        assert bundled is not None, name
        params, snapshots = bundled
        fresh = toy_model.init(spec.config, jax.random.key(0))
        assert [w.shape for w in params['weights']] == [w.shape for w in fresh['weights']], name
        assert float(params['gain']) != 0.0 and all(np.isfinite(w).all() for w in params['weights'])  # trained
        assert len(snapshots) == (16 if name == 'main' else 0), name
        assert toy2d._bundled(name, 0, spec._replace(steps=spec.steps + 1)) is None  # other settings: not these


def test_bundled_history():
    """The main run's last snapshot of its own profile is the bundled main model; its 1/8 snapshot, a
    history guide, is a different network."""
    from experiments import toy2d
    spec = toy2d.model_specs(toy2d.DEMO, 0.0)['main']
    params, snapshots = toy2d._bundled('main', 0, spec)
    last = snapshots[-1]
    assert (last.t, last.sigma_rel) == (spec.steps * spec.batch, spec.ema_sigma_rel)
    for a, b in zip(jax.tree.leaves(last.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    early = toy2d.history_guides(snapshots, spec)['history-early t=1/8'].params
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(jax.tree.leaves(early), jax.tree.leaves(params)))
    assert diff > 0.01
