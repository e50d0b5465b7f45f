"""torch state_dict names ↔ Flax variables, and architecture inference from names and shapes."""
import json
import subprocess
import sys

import numpy as np
import pytest

from helpers import torch_params
from convert.torch_names import (check_shapes, infer_config, network_to_torch, path_to_torch,
                                 precond_kwargs, torch_shapes, torch_to_network, torch_to_path)
from edm2_jax import PRESETS, EDM2Config


def test_paths_follow_the_documented_layout():
    assert torch_to_path('unet.enc.16x16_block0.conv_res0.weight') == (
        'params', 'unet', 'enc_16x16_block0', 'conv_res0', 'weight')
    assert torch_to_path('unet.emb_fourier.freqs') == ('buffers', 'unet', 'emb_fourier', 'freqs')
    assert torch_to_path('logvar_linear.weight') == ('params', 'logvar_linear', 'weight')
    for name in ('unet.dec.8x8_in0.emb_gain', 'unet.out_gain', 'logvar_fourier.phases'):
        assert path_to_torch(torch_to_path(name)) == name


def test_reference_round_trip_is_lossless(tiny_cond):
    sd = torch_params(tiny_cond)
    net = torch_to_network(sd)
    kwargs = json.loads(str(tiny_cond['config_json']))['precond_kwargs']
    assert net.config == EDM2Config(**kwargs)
    assert net.variables['params']['unet']['enc_16x16_conv']['weight'].shape == (3, 3, 5, 32)  # HWIO
    back = network_to_torch(net)
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_precond_kwargs_are_the_official_ones(tiny_cond):
    """The kwargs the official code was built with (recorded in the reference file), plus the
    two it passes always (dropout, use_fp16)."""
    official = json.loads(str(tiny_cond['config_json']))['precond_kwargs']
    assert precond_kwargs(EDM2Config(**official)) == {**official, 'dropout': 0.0, 'use_fp16': True}


@pytest.mark.parametrize('name', ['img512-s', 'img512-xs-uncond', 'img64-m'])
def test_presets_are_inferred_from_their_shapes(name):
    assert infer_config(torch_shapes(PRESETS[name]), dropout=PRESETS[name].dropout) == PRESETS[name]


def test_inference_of_uncommon_architectures():
    cfg = EDM2Config(img_resolution=16, img_channels=3, label_dim=7, model_channels=24, channel_mult=(2, 3),
                     channel_mult_noise=1, channel_mult_emb=5, num_blocks=2, attn_resolutions=(8,),
                     channels_per_head=24, logvar_channels=16)
    shapes = torch_shapes(cfg)
    # model_channels cannot be told from widths alone (48, 72 → 24 by gcd); channels_per_head is given.
    assert infer_config(shapes, channels_per_head=24) == cfg


def test_shape_errors_are_listed_together(tiny_cond):
    sd = torch_params(tiny_cond)
    del sd['unet.out_gain']
    sd['unet.extra.weight'] = np.zeros(3, np.float32)
    sd['unet.enc.16x16_conv.weight'] = np.zeros((32, 4, 3, 3), np.float32)
    cfg = infer_config({k: v.shape for k, v in sd.items()})
    with pytest.raises(ValueError) as err:
        check_shapes(cfg, {k: v.shape for k, v in sd.items()})
    message = str(err.value)
    assert 'missing (1): unet.out_gain' in message
    assert 'unexpected (1): unet.extra.weight' in message
    assert 'unet.enc.16x16_conv.weight: got (32, 4, 3, 3), expected (32, 5, 3, 3)' in message
    with pytest.raises(ValueError, match='no "unet.enc'):
        infer_config({'foo': (1,)})


@pytest.mark.slow
def test_mapping_needs_no_torch():
    code = ('import sys; sys.modules["torch"] = None; import convert.torch_names, convert.edm2; '
            'print("torch" in sys.modules and sys.modules["torch"] is not None)')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == 'False'
