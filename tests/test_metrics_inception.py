"""Inception-v3 (FID variant): features vs pytorch-fid's InceptionV3 with random weights (needs
torchvision; skipped without it), its pooling and resizing vs torch, and the converter's name layouts."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import jax
import jax.numpy as jnp

from convert import detectors
from edm2_jax.metrics import inception as I
from helpers import rel_err


def nhwc(a):
    return jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))


def test_pools_match_torch():
    x = np.random.default_rng(0).standard_normal((2, 5, 9, 7)).astype(np.float32)
    t = torch.from_numpy(x)
    cases = [(I.avg_pool_exclude_pad(nhwc(x)), F.avg_pool2d(t, 3, 1, 1, count_include_pad=False)),
             (I.max_pool(nhwc(x), 1, 1), F.max_pool2d(t, 3, 1, 1)),
             (I.max_pool(nhwc(x), 2), F.max_pool2d(t, 3, 2))]
    for ours, ref in cases:
        np.testing.assert_allclose(np.asarray(ours).transpose(0, 3, 1, 2), ref.numpy(), atol=1e-6)


@pytest.mark.parametrize('size', [512, 64, 299])
def test_preprocessing_matches_torch(size):
    img = np.random.default_rng(size).integers(0, 256, (1, size, size, 3), dtype=np.uint8)
    x = torch.from_numpy(img).permute(0, 3, 1, 2).float()
    # pytorch-fid: F.interpolate, then 2x − 1 on [0, 1] values.
    t = F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)
    np.testing.assert_allclose(np.asarray(I.preprocess(img / 255, 'pytorch_fid')).transpose(0, 3, 1, 2),
                               (2 * t / 255 - 1).numpy(), atol=1e-4, rtol=0)
    # EDM2's pickled detector: TF1 legacy resize as affine_grid + grid_sample, then (x − 128)/128.
    theta = torch.eye(2, 3)
    theta[0, 2] += 1 / size - 1 / 299
    theta[1, 2] += 1 / size - 1 / 299
    grid = F.affine_grid(theta[None], [1, 3, 299, 299], align_corners=False)
    t = F.grid_sample(x, grid, mode='bilinear', padding_mode='border', align_corners=False)
    np.testing.assert_allclose(np.asarray(I.preprocess(img, 'nvidia')).transpose(0, 3, 1, 2),
                               ((t - 128) / 128).numpy(), atol=1e-4, rtol=0)


def random_fid_state(seed=0):
    """A random state dict in pytorch-fid's weight-file layout (torchvision names, 1008-way fc):
    He-scaled convs and non-trivial BatchNorm statistics."""
    import torchvision
    net = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in net.state_dict().items():
        if k.endswith('conv.weight'):
            v = torch.randn(v.shape, generator=g) * (2 / v[0].numel()) ** 0.5
        elif k.endswith(('bn.weight', 'bn.running_var')):
            v = 0.5 + torch.rand(v.shape, generator=g)
        elif k.endswith(('bn.bias', 'bn.running_mean')):
            v = 0.1 * torch.randn(v.shape, generator=g)
        state[k] = v
    return state


def test_matches_pytorch_fid_inception(monkeypatch, tmp_path):
    pytest.importorskip('torchvision', reason='pytorch-fid needs torchvision (torch==2.14.1 torchvision==0.29.1)')
    pfi = pytest.importorskip('pytorch_fid.inception', reason='pytorch-fid is not installed')
    state = random_fid_state()
    monkeypatch.setattr(pfi, 'load_state_dict_from_url', lambda *a, **k: state)   # offline
    model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    torch.save(state, tmp_path / 'pt_inception-2015-12-05-test.pth')
    detectors.convert_inception(tmp_path / 'pt_inception-2015-12-05-test.pth', tmp_path / 'ckpt')
    from edm2_jax import checkpoint
    variables, meta = checkpoint.load_variables(tmp_path / 'ckpt')
    assert meta['format'] == detectors.INCEPTION_FORMAT
    x = np.random.default_rng(0).random((2, 3, 128, 128), dtype=np.float32)   # resized to 299 by both
    with torch.no_grad():
        ref = model(torch.from_numpy(x))[0].squeeze(-1).squeeze(-1).numpy()
    ours = np.asarray(I.make_feature_fn(variables, 'pytorch_fid')(x.transpose(0, 2, 3, 1)))
    assert ref.shape == ours.shape == (2, 2048)
    assert rel_err(ours, ref) <= 1e-4
    # The wrapper's own state dict (blocks.i.j.* names) converts to the same variables.
    wrapped = detectors.inception_variables({k: v.numpy() for k, v in model.state_dict().items()})
    for a, b in zip(jax.tree.leaves(wrapped), jax.tree.leaves(variables), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_converter_maps_both_layouts_and_rejects_strays():
    abstract = I.init_variables(abstract=True)['params']
    # torchvision's inception_v3(num_classes=1008, aux_logits=False) state dict without fc and
    # num_batches_tracked holds 21,820,000 numbers (counted with torchvision 0.29.1).
    assert I.num_params({'params': abstract}) == 21_820_000
    with pytest.raises(ValueError, match='unexpected Inception parameter'):
        detectors.inception_variables({'Mixed_5b.branch1x1.conv.bias': np.zeros(64)})
    with pytest.raises(ValueError, match='missing'):
        detectors.inception_variables({'blocks.0.0.conv.weight': np.zeros((32, 3, 3, 3))})
