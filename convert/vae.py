"""SD-VAE weights (diffusers `AutoencoderKL` or original CompVis/LDM layout) → an edm2-jax VAE
checkpoint directory holding the decoder half (post_quant_conv + decoder).

    python -m convert.vae --src=PATH --dst=DIR [--overwrite] [--norm_num_groups=32]

`--src` is a diffusers model directory (its config.json gives the configuration; a pipeline
directory with a `vae/` subfolder also works) or a weights file read by `convert.readers`:
`.safetensors` (without torch), `.bin`/`.ckpt`/`.pt`/`.pth` (`torch.load(weights_only=True)`), in diffusers key layout
(`decoder.up_blocks.0.resnets.0.conv1.weight`) or LDM layout (`decoder.up.3.block.0.conv1.weight`,
as in `vae-ft-mse-840000-ema-pruned.ckpt`; a `first_stage_model.` prefix is stripped). For a bare
file the configuration is read off the shapes; only `norm_num_groups` cannot be, so it is a flag.
Encoder weights are ignored.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from absl import app, flags

from convert.readers import is_float, read_weights
from edm2_jax import io
from edm2_jax import vae as vae_lib
from edm2_jax.errors import UserError, cli_main

WEIGHT_FILES = ('diffusion_pytorch_model.safetensors', 'diffusion_pytorch_model.bin')
_PREFIXES = ('first_stage_model.', 'vae.')       # full Stable Diffusion checkpoints, wrappers


# ------------------------------------------------------------------------------------------------
# Key layouts → diffusers names → Flax variables

_LDM_RESNET = {'nin_shortcut': 'conv_shortcut'}
_LDM_ATTN = {'norm': 'group_norm', 'q': 'to_q', 'k': 'to_k', 'v': 'to_v', 'proj_out': 'to_out.0'}
# diffusers < 0.14 names of the mid-block attention (still in some hub weight files).
_OLD_DIFFUSERS_ATTN = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v', 'proj_attn': 'to_out.0'}


def decoder_state(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The decoder's tensors under diffusers names, from either layout; other keys are dropped."""
    for prefix in _PREFIXES:
        if any(k.startswith(prefix + 'decoder.') for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    state = {k: v for k, v in state.items() if k.startswith(('decoder.', 'post_quant_conv.'))}
    if not any(k.startswith('decoder.') for k in state):
        raise ValueError('no decoder weights found (expected keys starting with "decoder.")')
    if any(k.startswith(('decoder.up.', 'decoder.mid.', 'decoder.norm_out.')) for k in state):
        state = _ldm_to_diffusers(state)
    out = {}
    for k, v in state.items():
        m = re.fullmatch(r'(decoder\.mid_block\.attentions\.0\.)(.+)\.(weight|bias)', k)
        if m and m.group(2) in _OLD_DIFFUSERS_ATTN:
            k = m.group(1) + _OLD_DIFFUSERS_ATTN[m.group(2)] + '.' + m.group(3)
        if m and v.ndim == 4:                  # 1×1 conv attention projections → linear
            v = v.reshape(v.shape[:2])
        out[k] = v
    return out


def _ldm_to_diffusers(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    levels = {int(m.group(1)) for k in state if (m := re.match(r'decoder\.up\.(\d+)\.', k))}
    if levels != set(range(len(levels))):
        raise ValueError(f'LDM checkpoint has non-contiguous decoder.up levels {sorted(levels)}')
    out = {}
    for k, v in state.items():
        new = k
        if m := re.fullmatch(r'decoder\.up\.(\d+)\.block\.(\d+)\.(\w+)\.(weight|bias)', k):
            i = len(levels) - 1 - int(m.group(1))
            new = f'decoder.up_blocks.{i}.resnets.{m.group(2)}.' \
                  f'{_LDM_RESNET.get(m.group(3), m.group(3))}.{m.group(4)}'
        elif m := re.fullmatch(r'decoder\.up\.(\d+)\.upsample\.conv\.(weight|bias)', k):
            new = f'decoder.up_blocks.{len(levels) - 1 - int(m.group(1))}.upsamplers.0.conv.{m.group(2)}'
        elif m := re.fullmatch(r'decoder\.mid\.block_([12])\.(\w+)\.(weight|bias)', k):
            new = f'decoder.mid_block.resnets.{int(m.group(1)) - 1}.' \
                  f'{_LDM_RESNET.get(m.group(2), m.group(2))}.{m.group(3)}'
        elif m := re.fullmatch(r'decoder\.mid\.attn_1\.(\w+)\.(weight|bias)', k):
            new = f'decoder.mid_block.attentions.0.{_LDM_ATTN.get(m.group(1), m.group(1))}.{m.group(2)}'
        elif k.startswith('decoder.norm_out.'):
            new = 'decoder.conv_norm_out.' + k[len('decoder.norm_out.'):]
        out[new] = v
    return out


def infer_config(state: dict[str, np.ndarray], norm_num_groups: int = 32) -> vae_lib.VAEConfig:
    """The decoder configuration implied by diffusers-named shapes (norm_num_groups is not)."""
    def shape(k):
        if k not in state:
            raise ValueError(f'cannot infer the VAE configuration: missing {k}')
        return state[k].shape
    num_up = len({m.group(1) for k in state if (m := re.match(r'decoder\.up_blocks\.(\d+)\.', k))})
    widths = [shape(f'decoder.up_blocks.{i}.resnets.0.conv1.weight')[0] for i in range(num_up)]
    resnets = {m.group(1) for k in state if (m := re.match(r'decoder\.up_blocks\.0\.resnets\.(\d+)\.', k))}
    return vae_lib.VAEConfig(
        latent_channels=shape('decoder.conv_in.weight')[1],
        out_channels=shape('decoder.conv_out.weight')[0],
        block_out_channels=tuple(widths[::-1]),
        layers_per_block=len(resnets) - 1,
        norm_num_groups=norm_num_groups,
        mid_block_add_attention=any(k.startswith('decoder.mid_block.attentions.') for k in state),
        use_post_quant_conv='post_quant_conv.weight' in state)


def to_variables(state: dict[str, np.ndarray]) -> dict:
    """diffusers names → Flax variables: `a.0.b.weight` → params[a_0][b][kernel|scale], conv
    OIHW → HWIO, linear [out, in] → [in, out], float32."""
    params = {}
    for k, v in state.items():
        if not is_float(v.dtype):
            raise ValueError(f'{k}: expected a floating-point tensor, got {v.dtype}')
        parts = []
        for p in k.split('.'):
            if p.isdigit() and parts:
                parts[-1] += '_' + p
            else:
                parts.append(p)
        *path, leaf = parts
        v = np.asarray(v, np.float32)
        if leaf == 'weight' and v.ndim == 4:
            leaf, v = 'kernel', v.transpose(2, 3, 1, 0)
        elif leaf == 'weight' and v.ndim == 2:
            leaf, v = 'kernel', v.T
        elif leaf == 'weight' and v.ndim == 1:
            leaf = 'scale'
        node = params
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = np.ascontiguousarray(v)
    return {'params': params}


# ------------------------------------------------------------------------------------------------
# Entry points

def resolve_source(src: Path) -> tuple[Path, dict | None]:
    """(weights file, diffusers config dict or None) for a model directory or a weights file."""
    if not src.exists():
        raise FileNotFoundError(f'--src {src} does not exist')
    if src.is_dir():
        if not (src / 'config.json').is_file() and (src / 'vae' / 'config.json').is_file():
            src = src / 'vae'
        if not (src / 'config.json').is_file():
            raise ValueError(f'{src} is a directory without config.json (not a diffusers model)')
        config = json.loads((src / 'config.json').read_text())
        if not isinstance(config, dict):
            raise ValueError(f'{src / "config.json"} is not a JSON object')
        if config.get('_class_name', 'AutoencoderKL') != 'AutoencoderKL':
            raise ValueError(f"{src}: _class_name {config['_class_name']!r} is not AutoencoderKL")
        for name in WEIGHT_FILES:
            if (src / name).is_file():
                return src / name, config
        raise ValueError(f'{src}: none of {", ".join(WEIGHT_FILES)} found')
    return src, None


def load_source(src, *, norm_num_groups: int | None = None):
    """(variables, VAEConfig, weights file) from a diffusers directory or a weights file."""
    weights, diffusers_config = resolve_source(Path(src))
    if diffusers_config is not None and norm_num_groups is not None:
        raise ValueError('--norm_num_groups is only for bare weight files; '
                         'a diffusers directory takes it from config.json')
    state = decoder_state(read_weights(weights))
    if diffusers_config is not None:
        config = vae_lib.VAEConfig.from_diffusers(diffusers_config)
    else:
        config = infer_config(state, 32 if norm_num_groups is None else norm_num_groups)
    variables = to_variables(state)
    vae_lib.check_variables(variables, config)
    return variables, config, weights


def convert(src, dst, *, overwrite: bool = False, norm_num_groups: int | None = None) -> dict:
    """Converts `src` and writes the checkpoint directory `dst`; returns its meta."""
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f'--dst {dst} exists (pass --overwrite to replace it)')
    from edm2_jax import checkpoint
    try:
        variables, config, weights = load_source(src, norm_num_groups=norm_num_groups)
    except (ValueError, TypeError) as e:  # bad weights or config.json: one line naming --src
        if isinstance(e, UserError):
            raise
        raise UserError(' '.join(str(e).split()), where=str(src)) from None
    meta = {'format': vae_lib.FORMAT, 'config': config.to_diffusers(),
            'source': {'file': str(weights.resolve()), 'sha256': io.sha256(weights)}}
    checkpoint.save_variables(dst, variables, meta, overwrite=overwrite)
    return meta


FLAGS = flags.FLAGS


def define_flags():
    """Flags are defined only when run as a script, so importing this module never clashes."""
    flags.DEFINE_string('src', None, 'diffusers AutoencoderKL directory or weights file '
                        '(.safetensors/.bin/.ckpt/.pt/.pth, diffusers or LDM key layout)')
    flags.DEFINE_string('dst', None, 'output checkpoint directory')
    flags.DEFINE_bool('overwrite', False, 'replace an existing --dst')
    flags.DEFINE_integer('norm_num_groups', None, 'GroupNorm groups for a bare weights file '
                         '(default 32, as in every SD VAE); not allowed with a diffusers directory')
    flags.mark_flags_as_required(['src', 'dst'])


@cli_main('convert.vae', catch=(FileNotFoundError, FileExistsError))
def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    meta = convert(FLAGS.src, FLAGS.dst, overwrite=FLAGS.overwrite,
                   norm_num_groups=FLAGS.norm_num_groups)
    cfg = vae_lib.VAEConfig.from_diffusers(meta['config'])
    print(f'wrote {FLAGS.dst}: SD-VAE decoder {cfg.block_out_channels}, '
          f'{vae_lib.param_count(cfg):,} parameters, from {meta["source"]["file"]} '
          f'(sha256 {meta["source"]["sha256"][:12]}…)')


if __name__ == '__main__':
    define_flags()
    app.run(main)
