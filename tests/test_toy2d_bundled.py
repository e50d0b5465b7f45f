"""The default demo's bundled models (experiments/toy2d_models) are the ones its settings ask for, so
`make demo` samples at once instead of training; a changed setting trains instead of loading them."""
import jax
import numpy as np

from edm2_jax.toy import model as toy_model


def test_bundled_models_match_the_demo():
    from experiments import toy2d
    specs = toy2d.model_specs(toy2d.DEMO, 0.0)
    assert set(specs) == {'main', 'ag', 'cfg'}
    for name, spec in specs.items():
        params = toy2d._bundled(name, 0, toy2d._spec_meta(spec, 0))
        assert params is not None, name
        fresh = toy_model.init(spec.config, jax.random.key(0))
        assert [w.shape for w in params['weights']] == [w.shape for w in fresh['weights']], name
        assert float(params['gain']) != 0.0 and all(np.isfinite(w).all() for w in params['weights'])  # trained
        other = toy2d._spec_meta(spec._replace(steps=spec.steps + 1), 0)
        assert toy2d._bundled(name, 0, other) is None  # other settings: not these weights
