"""DINOv2 detector: features vs transformers' Dinov2Model (and the torch-hub model when the `dinov2`
package is installed), the hub's offset interpolation vs torch, ViT-L/14 size, EDM2 preprocessing."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import jax.numpy as jnp

from convert import detectors
from edm2_jax.metrics import dinov2 as D
from helpers import rel_err


def perturbed(module, seed=0):
    """Random weights everywhere (zeros/ones of a fresh init would hide mapping errors)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return module.eval()


def features(config, variables, x_nchw):
    return np.asarray(D.DINOv2(config).apply(variables, jnp.asarray(x_nchw.transpose(0, 2, 3, 1))))


def test_matches_transformers_dinov2_with_interpolated_positions():
    transformers = pytest.importorskip('transformers')
    cfg = transformers.Dinov2Config(hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                                    mlp_ratio=4, image_size=28, patch_size=7, layerscale_value=0.5)
    model = perturbed(transformers.Dinov2Model(cfg))
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    config, variables = detectors.dinov2_variables(state, num_heads=3, interpolate_offset=0.0)
    assert (config.embed_dim, config.depth, config.pos_grid, config.patch_size) == (48, 2, 4, 7)
    x = np.random.default_rng(0).standard_normal((3, 3, 42, 35)).astype(np.float32)   # 6×5 grid vs 4×4
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).pooler_output.numpy()
    assert rel_err(features(config, variables, x), ref) <= 1e-4
    # The hub's +0.1 offset changes the result: the test above really goes through interpolation.
    hub_config = D.DINOv2Config(**{**config.to_dict(), 'interpolate_offset': 0.1})
    assert rel_err(features(hub_config, variables, x), ref) > 1e-3


def test_matches_torch_hub_dinov2_after_checkpoint_round_trip(tmp_path):
    vt = pytest.importorskip('dinov2.models.vision_transformer',
                             reason='the torch-hub DINOv2 code (pip install --no-deps dinov2) is not installed')
    model = perturbed(vt.DinoVisionTransformer(img_size=28, patch_size=7, embed_dim=48, depth=2, num_heads=3,
                                               init_values=0.5, block_chunks=0), seed=1)
    torch.save(model.state_dict(), tmp_path / 'hub.pth')
    detectors.convert_dinov2(tmp_path / 'hub.pth', tmp_path / 'ckpt', num_heads=3)
    from edm2_jax import checkpoint
    variables, meta = checkpoint.load_variables(tmp_path / 'ckpt')
    config = D.DINOv2Config(**meta['config'])
    assert (config.num_heads, config.interpolate_offset) == (3, 0.1)
    x = np.random.default_rng(1).standard_normal((2, 3, 42, 42)).astype(np.float32)  # 6×6 grid vs 4×4
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert rel_err(features(config, variables, x), ref) <= 1e-4


def test_hub_offset_interpolation_of_vitl14_grid_matches_torch():
    # ViT-L/14 at 224: 37×37 stored grid → 16×16 with scale_factor (16 + 0.1)/37, torch bicubic.
    grid = np.random.default_rng(2).standard_normal((1, 8, 37, 37)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(grid), scale_factor=(16.1 / 37, 16.1 / 37), mode='bicubic').numpy()
    w = D.pos_embed_matrix(D.VITL14, 16)
    ours = np.einsum('oh,nchw,pw->ncop', w, grid, w)
    assert ref.shape == ours.shape == (1, 8, 16, 16)
    assert rel_err(ours, ref) <= 1e-5


def test_vitl14_configuration_by_parameter_count():
    transformers = pytest.importorskip('transformers')
    cfg = transformers.Dinov2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                    mlp_ratio=4, image_size=518, patch_size=14)
    with torch.device('meta'):
        hf_count = sum(p.numel() for p in transformers.Dinov2Model(cfg).parameters())
    ours = D.num_params(D.init_variables(D.VITL14, abstract=True))
    assert ours == hf_count == 304_368_640


@pytest.mark.parametrize('size', [512, 64, 224])
def test_preprocessing_matches_torch_bicubic_antialias(size):
    img = np.random.default_rng(size).integers(0, 256, (1, size, size, 3), dtype=np.uint8)
    t = torch.from_numpy(img).permute(0, 3, 1, 2).to(torch.float32)
    t = F.interpolate(t, size=(224, 224), mode='bicubic', antialias=True) / 255
    t = (t - torch.tensor(D.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(D.IMAGENET_STD).view(1, 3, 1, 1)
    ours = np.asarray(D.preprocess(img)).transpose(0, 3, 1, 2)
    # 1e-4 in normalised units is 0.006 of a grey level: float32 rounding, not a kernel difference.
    np.testing.assert_allclose(ours, t.numpy(), atol=1e-4, rtol=0)


def test_converter_rejects_unknown_layouts():
    with pytest.raises(ValueError, match='unexpected DINOv2 parameter'):
        detectors.dinov2_variables({'cls_token': np.zeros((1, 1, 8)), 'registers': np.zeros((1, 4, 8))})
    with pytest.raises(ValueError, match='lack pos_embed'):
        detectors.dinov2_variables({'cls_token': np.zeros((1, 1, 8))})
