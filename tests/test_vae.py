"""SD-VAE decoder: equivalence with diffusers' AutoencoderKL (diffusers and LDM weight layouts),
parameter count of sd-vae-ft-mse, EDM2's latent → uint8 convention (spec §3.3), converter errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

from convert import readers
from convert import vae as convert_vae
from edm2_jax import decoder, vae

REPO = Path(__file__).resolve().parents[1]
SMALL = {
    'two_level': dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8),
    'three_level': dict(block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=8),
}
# stabilityai/sd-vae-ft-mse config.json (decoder-relevant keys and the encoder ones we must ignore).
SD_VAE_FT_MSE = {
    '_class_name': 'AutoencoderKL', '_diffusers_version': '0.4.2', 'act_fn': 'silu',
    'block_out_channels': [128, 256, 512, 512], 'down_block_types': ['DownEncoderBlock2D'] * 4,
    'in_channels': 3, 'latent_channels': 4, 'layers_per_block': 2, 'norm_num_groups': 32,
    'out_channels': 3, 'sample_size': 256, 'up_block_types': ['UpDecoderBlock2D'] * 4,
}
SPEC_SCALE = [0.11990407, 0.10822511, 0.13477089, 0.15243903]      # spec §3.3, printed values
SPEC_BIAS = [-0.69664264, -0.3517316, -0.01617251, 0.32774392]


def diffusers_vae(block_out_channels, layers_per_block, norm_num_groups, seed=0):
    """A randomly initialised AutoencoderKL with every parameter perturbed (norms, biases too) and
    sharpened attention logits, so that a wrong transpose or mapping cannot hide."""
    torch.manual_seed(seed)
    n = len(block_out_channels)
    model = AutoencoderKL(block_out_channels=block_out_channels, layers_per_block=layers_per_block,
                          norm_num_groups=norm_num_groups, down_block_types=('DownEncoderBlock2D',) * n,
                          up_block_types=('UpDecoderBlock2D',) * n).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.1 * torch.randn_like(p))
            if name.endswith(('to_q.weight', 'to_k.weight')):
                p.mul_(4.0)
    return model


def diffusers_to_ldm(state):
    """Independent inverse rename: diffusers AutoencoderKL keys → CompVis/LDM keys (attention
    projections as 1×1 conv weights)."""
    levels = 1 + max(int(k.split('.')[2]) for k in state if k.startswith('decoder.up_blocks.'))
    attn = {'group_norm': 'norm', 'to_q': 'q', 'to_k': 'k', 'to_v': 'v', 'to_out.0': 'proj_out'}
    out = {}
    for k, v in state.items():
        new = k.replace('conv_shortcut', 'nin_shortcut')
        if k.startswith('decoder.up_blocks.'):
            _, _, i, rest = new.split('.', 3)
            rest = rest.replace('resnets.', 'block.').replace('upsamplers.0.', 'upsample.')
            new = f'decoder.up.{levels - 1 - int(i)}.{rest}'
        elif k.startswith('decoder.mid_block.resnets.'):
            j, rest = new[len('decoder.mid_block.resnets.'):].split('.', 1)
            new = f'decoder.mid.block_{int(j) + 1}.{rest}'
        elif k.startswith('decoder.mid_block.attentions.0.'):
            rest = k[len('decoder.mid_block.attentions.0.'):]
            module, leaf = rest.rsplit('.', 1)
            new = f'decoder.mid.attn_1.{attn[module]}.{leaf}'
            if leaf == 'weight' and v.ndim == 2:
                v = v[:, :, None, None]
        elif k.startswith('decoder.conv_norm_out.'):
            new = k.replace('conv_norm_out', 'norm_out')
        out[new] = v.clone()
    return out


def old_attention_names(state):
    """diffusers < 0.14 attention names (query/key/value/proj_attn), as in old hub weight files."""
    ren = {'to_q': 'query', 'to_k': 'key', 'to_v': 'value', 'to_out.0': 'proj_attn'}
    out = {}
    for k, v in state.items():
        for a, b in ren.items():
            k = k.replace(f'attentions.0.{a}.', f'attentions.0.{b}.')
        out[k] = v
    return out


_BUILT = {}


def build_small(name, tmp_path_factory):
    """A small diffusers VAE saved in every supported layout, and its decode of random latents."""
    if name in _BUILT:
        return _BUILT[name]
    kwargs = SMALL[name]
    model = diffusers_vae(**kwargs)
    root = tmp_path_factory.mktemp(name)
    model.save_pretrained(root / 'diffusers', safe_serialization=True)
    state = model.state_dict()
    ldm = diffusers_to_ldm(state)
    torch.save({'state_dict': ldm, 'global_step': 840000}, root / 'ldm.ckpt')
    save_file({'first_stage_model.' + k: v.contiguous() for k, v in ldm.items()},
              root / 'ldm_prefixed.safetensors')
    torch.save(old_attention_names(state), root / 'old_names.bin')
    z = np.random.default_rng(1).standard_normal((2, 4, 8, 8)).astype(np.float32)
    with torch.no_grad():
        ref = model.decode(torch.from_numpy(z)).sample.numpy()
    _BUILT[name] = dict(kwargs=kwargs, root=root, z=z.transpose(0, 2, 3, 1),
                        ref=ref.transpose(0, 2, 3, 1))
    return _BUILT[name]


@pytest.fixture(scope='module', params=list(SMALL))
def small(request, tmp_path_factory):
    return build_small(request.param, tmp_path_factory)


@pytest.fixture(scope='module')
def two_level(tmp_path_factory):
    return build_small('two_level', tmp_path_factory)


@pytest.mark.parametrize('source', ['diffusers', 'ldm.ckpt', 'ldm_prefixed.safetensors',
                                    'old_names.bin'])
def test_decode_matches_diffusers(small, source):
    groups = None if source == 'diffusers' else small['kwargs']['norm_num_groups']
    variables, config, _ = convert_vae.load_source(small['root'] / source, norm_num_groups=groups)
    assert config == vae.VAEConfig(**small['kwargs'])
    out = np.asarray(vae.VAEDecoder(variables, config)(small['z']))
    assert out.shape == small['ref'].shape
    err = np.abs(out - small['ref']).max()
    print(f'{source}: max abs err {err:.2e} (output scale {np.abs(small["ref"]).max():.2f})')
    assert err <= 1e-4


def test_convert_and_load_roundtrip(two_level, tmp_path):
    meta = convert_vae.convert(two_level['root'] / 'ldm.ckpt', tmp_path / 'vae',
                               norm_num_groups=two_level['kwargs']['norm_num_groups'])
    assert meta['format'] == 'edm2-jax-vae' and len(meta['source']['sha256']) == 64
    assert json.loads((tmp_path / 'vae' / 'config.json').read_text())['config'] == meta['config']
    decoder = vae.load(tmp_path / 'vae')
    assert np.abs(np.asarray(decoder(two_level['z'])) - two_level['ref']).max() <= 1e-4
    with pytest.raises(FileExistsError):
        convert_vae.convert(two_level['root'] / 'diffusers', tmp_path / 'vae')
    convert_vae.convert(two_level['root'] / 'diffusers', tmp_path / 'vae', overwrite=True)


def test_pipeline_directory_uses_vae_subfolder(two_level, tmp_path):
    (tmp_path / 'vae').symlink_to(two_level['root'] / 'diffusers')
    variables, config, weights = convert_vae.load_source(tmp_path)
    assert config == vae.VAEConfig(**two_level['kwargs'])
    assert weights.name == 'diffusion_pytorch_model.safetensors'


def test_bfloat16_close_to_float32(two_level):
    variables, config, _ = convert_vae.load_source(two_level['root'] / 'diffusers')
    out = np.asarray(vae.VAEDecoder(variables, config, jnp.bfloat16)(two_level['z']))
    assert out.dtype == np.float32
    scale = np.abs(two_level['ref']).max()
    assert np.abs(out - two_level['ref']).max() <= 0.05 * scale


@pytest.mark.slow
def test_cli_converts(two_level, tmp_path):
    dst = tmp_path / 'cli'
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
    res = subprocess.run([sys.executable, '-m', 'convert.vae', f'--src={two_level["root"] / "ldm.ckpt"}',
                          f'--dst={dst}', '--norm_num_groups=8'], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert np.abs(np.asarray(vae.load(dst)(two_level['z'])) - two_level['ref']).max() <= 1e-4


def test_full_sd_vae_ft_mse_param_count():
    config = vae.VAEConfig.from_diffusers(SD_VAE_FT_MSE)
    assert config == vae.VAEConfig()
    with torch.device('meta'):
        model = AutoencoderKL(**{k: v for k, v in SD_VAE_FT_MSE.items() if not k.startswith('_')})
    expected = sum(p.numel() for m in (model.decoder, model.post_quant_conv) for p in m.parameters())
    assert vae.param_count(config) == expected
    # independent arithmetic as a cross-check of the layout (conv3 = 3×3 conv with bias, gn = GroupNorm)
    conv3 = lambda i, o: 9 * i * o + o  # noqa: E731
    gn = lambda c: 2 * c  # noqa: E731
    res = lambda i, o: gn(i) + conv3(i, o) + gn(o) + conv3(o, o) + (i * o + o if i != o else 0)  # noqa: E731
    count = 4 * 4 + 4 + conv3(4, 512) + 2 * res(512, 512) + gn(512) + 4 * (512 * 512 + 512)
    prev = 512
    for i, width in enumerate([512, 512, 256, 128]):
        count += sum(res(prev if j == 0 else width, width) for j in range(3))
        count += conv3(width, width) if i < 3 else 0
        prev = width
    count += gn(128) + conv3(128, 3)
    assert count == expected


def test_decoded_shape_and_abstract_layout():
    shapes = vae.abstract_variables(vae.VAEConfig())['params']
    assert shapes['decoder']['up_blocks_0']['resnets_2']['conv1']['kernel'].shape == (3, 3, 512, 512)
    assert shapes['decoder']['mid_block']['attentions_0']['to_out_0']['kernel'].shape == (512, 512)
    assert shapes['decoder']['up_blocks_3']['resnets_0']['conv_shortcut']['kernel'].shape == (1, 1, 256, 128)
    assert 'upsamplers_0' not in shapes['decoder']['up_blocks_3']
    config = vae.VAEConfig(**SMALL['three_level'])
    out = jax.eval_shape(vae.Decoder(config).apply, vae.abstract_variables(config),
                         jax.ShapeDtypeStruct((3, 8, 8, 4), jnp.float32))
    assert out.shape == (3, 32, 32, 3) and out.dtype == jnp.float32


# ------------------------------------------------------------------------------------------------
# Spec §3.3 conventions, checked against independent numpy arithmetic

def test_edm2_scale_bias_match_spec():
    scale, bias = decoder.edm2_scale_bias()
    assert scale.dtype == bias.dtype == np.float32
    np.testing.assert_allclose(scale, SPEC_SCALE, rtol=1e-7)
    np.testing.assert_allclose(bias, SPEC_BIAS, rtol=1e-6)


def test_edm2_to_raw_is_mean_plus_std_times_x_over_half():
    x = np.random.default_rng(0).standard_normal((2, 3, 5, 4)).astype(np.float32)
    raw_mean, raw_std = np.array([5.81, 3.25, 0.12, -2.15]), np.array([4.17, 4.62, 3.71, 3.28])
    expected = raw_mean + raw_std * x / 0.5
    got = np.asarray(vae.edm2_to_raw(x, np.array(SPEC_SCALE, np.float32), np.array(SPEC_BIAS, np.float32)))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_unit_to_uint8_clamps_and_truncates():
    x = np.array([-0.5, 0.0, 0.5, 0.999, 1.0, 1.5, 100 / 255 + 1e-6], np.float32)
    np.testing.assert_array_equal(vae.unit_to_uint8(x), [0, 0, 127, 254, 255, 255, 100])


def test_rgb_to_uint8_matches_standard_rgb_decode():
    x = np.array([-2.0, -1.0, 0.0, 0.5, 0.999, 1.0, 2.0], np.float32)
    np.testing.assert_array_equal(vae.rgb_to_uint8(x), [0, 0, 128, 191, 255, 255, 255])
    r = np.random.default_rng(0).uniform(-1.2, 1.2, (1000,)).astype(np.float32)
    expected = np.floor(np.clip(r * np.float32(127.5) + np.float32(128), 0, 255)).astype(np.uint8)
    np.testing.assert_array_equal(vae.rgb_to_uint8(r), expected)


def test_latents_to_uint8_full_path():
    """EDM2 latents → raw → 'decoder' → clamp [0, 1] → ×255 → truncate, with a known decoder."""
    x = np.random.default_rng(2).standard_normal((3, 4, 4, 4)).astype(np.float32)
    decoder_fn = lambda raw: raw[..., :3] * 0.1 + 0.3  # noqa: E731
    raw = np.array([5.81, 3.25, 0.12, -2.15]) + np.array([4.17, 4.62, 3.71, 3.28]) * x / 0.5
    expected = np.floor(np.clip(raw[..., :3] * 0.1 + 0.3, 0, 1) * 255).astype(np.uint8)
    scale, bias = decoder.edm2_scale_bias()
    got = np.asarray(jax.jit(vae.latents_to_uint8, static_argnums=0)(decoder_fn, x, scale, bias))
    assert got.dtype == np.uint8
    # float32 rounding may move a value sitting on an integer boundary by one step
    assert np.abs(got.astype(int) - expected).max() <= 1 and (got == expected).mean() > 0.98


def test_chunked_decode_equals_one_batch(two_level):
    variables, config, _ = convert_vae.load_source(two_level['root'] / 'diffusers')
    sd_vae = vae.VAEDecoder(variables, config)
    x = np.random.default_rng(3).standard_normal((3, 8, 8, 4)).astype(np.float32)
    scale, bias = decoder.edm2_scale_bias()
    whole = np.asarray(vae.latents_to_uint8(sd_vae, x, scale, bias))
    chunked = vae.decode_latents_to_uint8(sd_vae, x, scale, bias, batch_size=2)
    np.testing.assert_array_equal(chunked, whole)
    meta = {'type': 'sd-vae', 'scale': scale.tolist(), 'bias': bias.tolist()}
    np.testing.assert_array_equal(vae.make_image_decoder(meta, sd_vae, batch_size=2)(x), whole)


SHARDED_SCRIPT = """
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from edm2_jax import decoder, vae
assert len(jax.devices()) == 2
config = vae.VAEConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)
rng = np.random.default_rng(0)
dec = vae.VAEDecoder(jax.tree.map(lambda a: 0.1 * rng.standard_normal(a.shape).astype(np.float32),
                                  vae.abstract_variables(config)), config)
mesh = jax.make_mesh((2,), ('data',))
rep = jax.device_put(dec, NamedSharding(mesh, P()))
x = np.random.default_rng(0).standard_normal((5, 8, 8, 4)).astype(np.float32)
s, b = decoder.edm2_scale_bias()
a = vae.decode_latents_to_uint8(rep, x, s, b, batch_size=4, sharding=NamedSharding(mesh, P('data')))
c = vae.decode_latents_to_uint8(dec, x, s, b, batch_size=4)
assert a.shape == (5, 16, 16, 3) and np.abs(a.astype(int) - c).max() <= 1, np.abs(a.astype(int) - c).max()
try:
    vae.decode_latents_to_uint8(rep, x, s, b, batch_size=3, sharding=NamedSharding(mesh, P('data')))
    raise SystemExit('no error for batch_size=3 over 2 devices')
except ValueError as e:
    assert 'batch_size=3' in str(e)
print('ok')
"""


def test_sharded_decode_two_devices():
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'JAX_NUM_CPU_DEVICES': '2'}
    res = subprocess.run([sys.executable, '-c', SHARDED_SCRIPT], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and 'ok' in res.stdout, res.stderr[-3000:]


# ------------------------------------------------------------------------------------------------
# Errors

def test_read_safetensors_dtypes(tmp_path):
    tensors = {'a': torch.randn(3, 2), 'b': torch.randn(4).half(), 'c': torch.randn(2, 2).bfloat16()}
    save_file(tensors, tmp_path / 'x.safetensors')
    got = readers.read_safetensors(tmp_path / 'x.safetensors')
    for k, t in tensors.items():
        np.testing.assert_array_equal(np.asarray(got[k], np.float32), t.float().numpy())
    (tmp_path / 'bad.safetensors').write_bytes(b'\xff' * 16)
    with pytest.raises(ValueError, match='safetensors'):
        readers.read_safetensors(tmp_path / 'bad.safetensors')


def test_converter_errors(two_level, tmp_path):
    with pytest.raises(FileNotFoundError):
        convert_vae.load_source(tmp_path / 'missing')
    (tmp_path / 'w.npz').write_bytes(b'')
    with pytest.raises(ValueError, match='unknown weights format'):
        convert_vae.load_source(tmp_path / 'w.npz')
    with pytest.raises(ValueError, match='norm_num_groups'):
        convert_vae.load_source(two_level['root'] / 'diffusers', norm_num_groups=8)
    bad = tmp_path / 'bad_config'
    bad.mkdir()
    cfg = json.loads((two_level['root'] / 'diffusers' / 'config.json').read_text())
    (bad / 'config.json').write_text(json.dumps({**cfg, 'layers_per_block': cfg['layers_per_block'] + 1}))
    (bad / 'diffusion_pytorch_model.safetensors').symlink_to(
        two_level['root'] / 'diffusers' / 'diffusion_pytorch_model.safetensors')
    with pytest.raises(ValueError, match='missing params/decoder/up_blocks_0/resnets_2/'):
        convert_vae.load_source(bad)
    (bad / 'config.json').write_text(json.dumps({**cfg, 'act_fn': 'gelu'}))
    with pytest.raises(ValueError, match='act_fn'):
        convert_vae.load_source(bad)
    save_file({'encoder.conv_in.weight': torch.zeros(1)}, tmp_path / 'enc.safetensors')
    with pytest.raises(ValueError, match='no decoder weights'):
        convert_vae.load_source(tmp_path / 'enc.safetensors')


def test_decode_errors(tmp_path):
    with pytest.raises(ValueError, match='channels'):
        vae.decode_latents_to_uint8(vae.VAEDecoder({}, vae.VAEConfig(**SMALL['two_level'])),
                                    np.zeros((1, 8, 8, 3)), *decoder.edm2_scale_bias())
    with pytest.raises(ValueError, match='latent model'):
        vae.make_image_decoder({'type': 'sd-vae', 'scale': SPEC_SCALE, 'bias': SPEC_BIAS})
    with pytest.raises(ValueError, match='norm_num_groups'):
        vae.VAEConfig(block_out_channels=(30,), norm_num_groups=8)
    from edm2_jax import checkpoint
    checkpoint.save_variables(tmp_path / 'net', {'w': np.zeros(2)}, {'format': 'edm2-jax'})
    with pytest.raises(ValueError, match='not a VAE checkpoint'):
        vae.load(tmp_path / 'net')
