"""`python -m experiments.decode`: generate's saved latents → the PNGs `generate --vae` writes, with a
tiny random SD-VAE decoder (the decoder itself is checked against diffusers in test_vae.py)."""
import jax
import numpy as np
import pytest

from edm2_jax import checkpoint, io, vae as vae_lib
from edm2_jax.config import EDM2Config
from edm2_jax.errors import UserError
from helpers import write_tiny_checkpoint

TINY_VAE = vae_lib.VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)
LATENT_NET = EDM2Config(img_resolution=4, img_channels=4, label_dim=0, model_channels=8, channel_mult=(1,),
                        num_blocks=1, attn_resolutions=(), channels_per_head=8, logvar_channels=8)


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    from convert.random import write_random
    root = tmp_path_factory.mktemp('decode')
    variables = vae_lib.Decoder(TINY_VAE).init(jax.random.key(0), np.zeros((1, 4, 4, 4), np.float32))
    checkpoint.save_variables(root / 'vae', variables, {'format': vae_lib.FORMAT, 'config': TINY_VAE.to_diffusers()})
    write_random(root / 'net', LATENT_NET)  # 4 channels: decoder 'sd-vae' with EDM2's scale/bias
    latents = root / 'latents'
    rng = np.random.default_rng(0)
    x = {seed: rng.normal(size=(4, 4, 4)).astype(np.float32) for seed in (3, 7, 1001)}
    for seed, v in x.items():
        io.save_npy(latents / (f'{seed // 1000 * 1000:06d}/{seed:06d}.npy' if seed >= 1000 else f'{seed:06d}.npy'), v)
    io.write_json(latents / 'run.json', {'checkpoints': {'net': {'path': str(root / 'net')}}})
    return root, x, variables


def expected_png(x, variables):
    """raw = (x − bias)/scale with EDM2's published statistics, decoded, [0, 1] → uint8 by truncation."""
    raw_mean, raw_std = np.array([5.81, 3.25, 0.12, -2.15]), np.array([4.17, 4.62, 3.71, 3.28])
    scale = np.float32(0.5) / raw_std.astype(np.float32)
    raw = x * 1.0 / scale + raw_mean  # (x − bias)/scale with bias = −mean·scale
    pixels = np.asarray(vae_lib.Decoder(TINY_VAE).apply(variables, raw[None].astype(np.float32)))[0]
    return (np.clip(pixels, 0, 1) * 255).astype(np.uint8)


def test_decodes_every_latent_and_resumes(setup):
    from PIL import Image
    from experiments.decode import decode_folder
    root, x, variables = setup
    out = root / 'png'
    assert decode_folder(root / 'latents', root / 'vae', out, batch=2) == (3, 0)
    for seed, v in x.items():
        sub = f'{seed // 1000 * 1000:06d}/' if seed >= 1000 else ''
        png = np.asarray(Image.open(out / f'{sub}{seed:06d}.png'))
        assert png.shape == (8, 8, 3)
        assert np.abs(png.astype(int) - expected_png(v, variables)).max() <= 1  # float rounding at a step
    assert decode_folder(root / 'latents', root / 'vae', out, net=str(root / 'net')) == (0, 3)


def test_bad_inputs_name_the_flag(setup, tmp_path):
    from experiments.decode import decode_folder
    root, _, _ = setup
    with pytest.raises(UserError, match='--latents'):
        decode_folder(tmp_path, root / 'vae', tmp_path / 'o')
    with pytest.raises(UserError, match='--vae'):
        decode_folder(root / 'latents', root / 'net', tmp_path / 'o')
    with pytest.raises(UserError, match='not a latent model'):
        decode_folder(root / 'latents', root / 'vae', tmp_path / 'o', net=str(write_tiny_checkpoint(tmp_path / 'rgb')))
    with pytest.raises(UserError, match='run.json'):
        decode_folder(_copy_without_run(root / 'latents', tmp_path / 'l'), root / 'vae', tmp_path / 'o')
    assert not (tmp_path / 'o').exists()  # nothing written on bad input


def _copy_without_run(src, dst):
    import shutil
    shutil.copytree(src, dst)
    (dst / 'run.json').unlink()
    return dst
