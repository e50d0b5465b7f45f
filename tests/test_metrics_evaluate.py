"""experiments.evaluate end to end with a tiny random DINOv2 detector: make_ref from a PNG folder,
evaluate the same images as .npz (FD ≈ 0), a different set (FD > 0), precision/recall, the protocol."""
import json

import jax
import numpy as np
import pytest
from PIL import Image

from convert import detectors
from edm2_jax import checkpoint
from edm2_jax.errors import UserError
from edm2_jax.metrics import dinov2 as D
from edm2_jax.metrics.frechet import load_refs
from experiments import evaluate


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp('eval')
    config = D.DINOv2Config(patch_size=14, embed_dim=32, depth=1, num_heads=2, pos_grid=4)
    variables = D.init_variables(config, jax.random.key(0))
    checkpoint.save_variables(root / 'det' / 'dinov2', variables,
                              {'format': detectors.DINOV2_FORMAT, 'config': config.to_dict()})
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    for seed, img in enumerate(images):                       # EDM2 layout with subdirectories
        (root / 'png' / '000000').mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / 'png' / '000000' / f'{seed:06d}.png')
    np.savez(root / 'same.npz', arr_0=images)
    np.savez(root / 'other.npz', arr_0=(images // 4).astype(np.uint8))
    return root


def test_ref_round_trip_and_distances(setup):
    root = setup
    common = dict(metrics=['fd_dinov2'], detectors_dir=root / 'det', num_images=0, batch=5, progress=False)
    evaluate.run(root / 'png', root / 'ref.pkl', make_ref=True, **common)
    refs = load_refs(root / 'ref.pkl')
    assert refs['num_images'] == 12 and refs['fd_dinov2']['mu'].shape == (32,)
    same = evaluate.run(root / 'same.npz', root / 'ref.pkl', **common)
    other = evaluate.run(root / 'other.npz', root / 'ref.pkl', **common)
    assert abs(same['fd_dinov2']) < 1e-6 < other['fd_dinov2']
    pr = evaluate.run(root / 'same.npz', root / 'png', **{**common, 'metrics': ['fd_dinov2', 'precision', 'recall']})
    assert pr['precision_dinov2'] == pr['recall_dinov2'] == 1.0 and abs(pr['fd_dinov2']) < 1e-6
    json.dumps(pr)


def test_protocol_and_bad_inputs(setup):
    root = setup
    assert len(evaluate.select(20, 12, 0)) == 12 and list(evaluate.select(12, 12, 0)) == list(range(12))
    with pytest.raises(ValueError, match='need 50000'):
        evaluate.select(12, 50000, 0)
    with pytest.raises(ValueError, match='no statistics for fid'):
        evaluate.run(root / 'same.npz', root / 'ref.pkl', ['fid'], root / 'det', num_images=0)
    with pytest.raises(ValueError, match='unknown metrics'):
        evaluate.run(root / 'same.npz', root / 'ref.pkl', ['is'], root / 'det')
    with pytest.raises(UserError, match='convert.detectors'):
        evaluate.run(root / 'same.npz', root / 'png', ['fid'], root / 'nowhere', num_images=0)
