"""Feature-detector weights (FID's Inception-v3, FD_DINOv2's ViT) → edm2-jax checkpoint directories.

    python -m convert.detectors --inception=pt_inception-2015-12-05-6726825d.pth --dst_dir=DIR
    python -m convert.detectors --dinov2=dinov2_vitl14_pretrain.pth --dst_dir=DIR

writes DIR/inception and/or DIR/dinov2 (see `experiments.evaluate --detectors=DIR`).

- Inception: pytorch-fid's weight file (torchvision names `Mixed_5b.branch1x1.conv.weight`,
  `.bn.running_mean`, ...) or the state dict of pytorch-fid's `InceptionV3` wrapper (`blocks.2.0.…`).
  The 1008-way `fc` head is dropped.
- DINOv2: the torch-hub checkpoint (`patch_embed.proj`, `blocks.N.attn.qkv`, `blocks.N.ls1.gamma`,
  `norm`, `pos_embed`, `cls_token`, `mask_token`) or Hugging Face's `Dinov2Model` layout
  (`embeddings.*`, `encoder.layer.N.attention.attention.{query,key,value}`, `layer_scale1.lambda1`,
  `layernorm`; a model directory with config.json and model.safetensors also works). The position
  embedding is interpolated the torch-hub way (EDM2's detector) unless --dinov2_interpolation=hf.
Files are read with torch.load(weights_only=True) or as .safetensors (no torch needed).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import numpy as np
from absl import app, flags

from convert.readers import read_weights
from edm2_jax import io
from edm2_jax.errors import cli_main
from edm2_jax.metrics import dinov2 as dinov2_lib
from edm2_jax.metrics import inception as inception_lib

INCEPTION_FORMAT = 'edm2-jax-inception-fid'
DINOV2_FORMAT = 'edm2-jax-dinov2'
INTERPOLATION_OFFSETS = {'hub': 0.1, 'hf': 0.0}


def _check_tree(variables, expected, what):
    """Same paths and shapes as `expected` (an abstract init), or a ValueError naming the first misfit."""
    got = {jax.tree_util.keystr(p): np.shape(v) for p, v in jax.tree_util.tree_leaves_with_path(variables)}
    want = {jax.tree_util.keystr(p): tuple(v.shape) for p, v in jax.tree_util.tree_leaves_with_path(expected)}
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        raise ValueError(f'{what}: missing {missing[:5]}, unexpected {extra[:5]}')
    for k in want:
        if got[k] != want[k]:
            raise ValueError(f'{what}: {k} has shape {got[k]}, expected {want[k]}')


def _set(tree, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    if path[-1] in tree:
        raise ValueError(f'duplicate parameter {"/".join(path)}')
    tree[path[-1]] = np.asarray(value, np.float32)


# ------------------------------------------------------------------------------------------------
# Inception

_FID_WRAPPER_BLOCKS = (('Conv2d_1a_3x3', 'Conv2d_2a_3x3', 'Conv2d_2b_3x3'),
                       ('Conv2d_3b_1x1', 'Conv2d_4a_3x3'),
                       ('Mixed_5b', 'Mixed_5c', 'Mixed_5d', 'Mixed_6a', 'Mixed_6b', 'Mixed_6c',
                        'Mixed_6d', 'Mixed_6e'),
                       ('Mixed_7a', 'Mixed_7b', 'Mixed_7c'))
_BN = {'weight': 'scale', 'bias': 'bias', 'running_mean': 'mean', 'running_var': 'var'}


def inception_variables(state: dict) -> dict:
    """pytorch-fid / torchvision Inception-v3 state dict → variables of `InceptionV3FID`."""
    params = {}
    for name, value in state.items():
        m = re.fullmatch(r'blocks\.(\d)\.(\d)\.(.*)', name)
        if m:                                      # pytorch-fid InceptionV3 wrapper → torchvision
            i, j, rest = int(m[1]), int(m[2]), m[3]
            if i >= len(_FID_WRAPPER_BLOCKS) or j >= len(_FID_WRAPPER_BLOCKS[i]):
                raise ValueError(f'unexpected parameter {name}')
            name = f'{_FID_WRAPPER_BLOCKS[i][j]}.{rest}'
        if name.startswith(('fc.', 'AuxLogits.')) or name.endswith('num_batches_tracked'):
            continue
        parts = name.split('.')
        if parts[-2] == 'conv' and parts[-1] == 'weight':
            _set(params, parts[:-2] + ['kernel'], np.transpose(value, (2, 3, 1, 0)))
        elif parts[-2] == 'bn' and parts[-1] in _BN:
            _set(params, parts[:-2] + [_BN[parts[-1]]], value)
        else:
            raise ValueError(f'unexpected Inception parameter {name}')
    variables = {'params': params}
    _check_tree(variables, inception_lib.init_variables(abstract=True), 'Inception weights')
    return variables


# ------------------------------------------------------------------------------------------------
# DINOv2

_HUB_BLOCK = {'norm1.weight': ('norm1', 'scale'), 'norm1.bias': ('norm1', 'bias'),
              'attn.qkv.weight': ('qkv', 'kernel'), 'attn.qkv.bias': ('qkv', 'bias'),
              'attn.proj.weight': ('proj', 'kernel'), 'attn.proj.bias': ('proj', 'bias'),
              'ls1.gamma': ('ls1',), 'ls2.gamma': ('ls2',),
              'norm2.weight': ('norm2', 'scale'), 'norm2.bias': ('norm2', 'bias'),
              'mlp.fc1.weight': ('fc1', 'kernel'), 'mlp.fc1.bias': ('fc1', 'bias'),
              'mlp.fc2.weight': ('fc2', 'kernel'), 'mlp.fc2.bias': ('fc2', 'bias')}
_HF_BLOCK = {'norm1': 'norm1', 'norm2': 'norm2', 'attention.output.dense': 'attn.proj',
             'attention.o_proj': 'attn.proj',
             'layer_scale1.lambda1': 'ls1.gamma', 'layer_scale2.lambda1': 'ls2.gamma',
             'mlp.fc1': 'mlp.fc1', 'mlp.fc2': 'mlp.fc2'}
_HF_TOP = {'embeddings.cls_token': 'cls_token', 'embeddings.mask_token': 'mask_token',
           'embeddings.position_embeddings': 'pos_embed', 'layernorm.weight': 'norm.weight',
           'layernorm.bias': 'norm.bias', 'embeddings.patch_embeddings.projection.weight':
           'patch_embed.proj.weight', 'embeddings.patch_embeddings.projection.bias': 'patch_embed.proj.bias'}


_QKV = {'q': 'query', 'k': 'key', 'v': 'value'}


def hf_to_hub(state: dict) -> dict:
    """Hugging Face `Dinov2Model` names (hub files: `attention.attention.query`, `attention.output.dense`;
    transformers ≥ 5 in memory: `attention.q_proj`, `attention.o_proj`) → torch-hub names, with q, k, v
    fused into qkv in that order."""
    state = {k.removeprefix('dinov2.'): v for k, v in state.items()}
    out, qkv = {}, {}
    for name, value in state.items():
        if name in _HF_TOP:
            out[_HF_TOP[name]] = value
            continue
        m = re.fullmatch(r'encoder\.layer\.(\d+)\.(.*)\.(weight|bias|lambda1)', name)
        if not m:
            raise ValueError(f'unexpected Dinov2Model parameter {name}')
        i, mod, kind = m[1], m[2], m[3]
        q = re.fullmatch(r'attention\.(?:attention\.(query|key|value)|([qkv])_proj)', mod)
        if q:
            qkv.setdefault((i, kind), {})[q[1] or _QKV[q[2]]] = value
        elif kind == 'lambda1' and f'{mod}.lambda1' in _HF_BLOCK:
            out[f'blocks.{i}.{_HF_BLOCK[mod + ".lambda1"]}'] = value
        elif mod in _HF_BLOCK:
            out[f'blocks.{i}.{_HF_BLOCK[mod]}.{kind}'] = value
        else:
            raise ValueError(f'unexpected Dinov2Model parameter {name}')
    for (i, kind), parts in qkv.items():
        if set(parts) != {'query', 'key', 'value'}:
            raise ValueError(f'layer {i}: attention {kind} lacks one of query/key/value')
        out[f'blocks.{i}.attn.qkv.{kind}'] = np.concatenate([parts['query'], parts['key'], parts['value']])
    return out


def dinov2_variables(state: dict, **config_overrides) -> tuple[dinov2_lib.DINOv2Config, dict]:
    """torch-hub or Hugging Face DINOv2 state dict → (DINOv2Config, variables of `DINOv2`)."""
    if any(k.removeprefix('dinov2.').startswith('embeddings.') for k in state):
        state = hf_to_hub(state)
    params = {}
    for name, value in state.items():
        value = np.asarray(value)
        if name in ('cls_token', 'mask_token', 'pos_embed'):
            _set(params, [name], value.reshape(-1, value.shape[-1]).squeeze(0) if name != 'pos_embed'
                 else value.reshape(-1, value.shape[-1]))
        elif name == 'patch_embed.proj.weight':
            _set(params, ['patch_embed', 'kernel'], np.transpose(value, (2, 3, 1, 0)))
        elif name == 'patch_embed.proj.bias':
            _set(params, ['patch_embed', 'bias'], value)
        elif name in ('norm.weight', 'norm.bias'):
            _set(params, ['norm', 'scale' if name.endswith('weight') else 'bias'], value)
        elif (m := re.fullmatch(r'blocks\.(\d+)\.(.*)', name)) and m[2] in _HUB_BLOCK:
            path = [f'blocks_{m[1]}', *_HUB_BLOCK[m[2]]]
            _set(params, path, value.T if path[-1] == 'kernel' else value)
        else:
            raise ValueError(f'unexpected DINOv2 parameter {name} (registers, SwiGLU and chunked '
                             f'blocks are not supported)')
    if 'mask_token' not in params and 'cls_token' in params:
        params['mask_token'] = np.zeros_like(params['cls_token'])
    for key in ('cls_token', 'pos_embed', 'patch_embed', 'blocks_0'):
        if key not in params:
            raise ValueError(f'DINOv2 weights lack {key}')
    config = dinov2_lib.infer_config(params, **config_overrides)
    variables = {'params': params}
    _check_tree(variables, dinov2_lib.init_variables(config, abstract=True), 'DINOv2 weights')
    return config, variables


def read_dinov2_source(src: Path) -> tuple[dict, dict, Path]:
    """(state dict, config overrides from a Hugging Face config.json, weights file)."""
    overrides = {}
    if src.is_dir():
        cfg = json.loads((src / 'config.json').read_text())
        overrides = {'num_heads': cfg['num_attention_heads'], 'layer_norm_eps': cfg.get('layer_norm_eps', 1e-6)}
        if cfg.get('use_swiglu_ffn') or cfg.get('hidden_act', 'gelu') != 'gelu':
            raise ValueError(f'{src}: only the GELU-MLP DINOv2 (ViT-S/B/L) is supported')
        files = [src / n for n in ('model.safetensors', 'pytorch_model.bin') if (src / n).is_file()]
        if not files:
            raise ValueError(f'{src}: neither model.safetensors nor pytorch_model.bin')
        src = files[0]
    return read_weights(src), overrides, src


# ------------------------------------------------------------------------------------------------
# Entry points

def convert_inception(src, dst, *, overwrite=False) -> dict:
    from edm2_jax import checkpoint
    src = Path(src)
    variables = inception_variables(read_weights(src))
    meta = {'format': INCEPTION_FORMAT, 'source': {'file': str(src.resolve()), 'sha256': io.sha256(src)}}
    checkpoint.save_variables(dst, variables, meta, overwrite=overwrite)
    return meta


def convert_dinov2(src, dst, *, interpolation='hub', num_heads=None, overwrite=False) -> dict:
    from edm2_jax import checkpoint
    state, overrides, weights = read_dinov2_source(Path(src))
    if num_heads is not None:
        overrides['num_heads'] = num_heads
    config, variables = dinov2_variables(
        state, interpolate_offset=INTERPOLATION_OFFSETS[interpolation], **overrides)
    meta = {'format': DINOV2_FORMAT, 'config': config.to_dict(),
            'source': {'file': str(weights.resolve()), 'sha256': io.sha256(weights)}}
    checkpoint.save_variables(dst, variables, meta, overwrite=overwrite)
    return meta


FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string('inception', None, "pytorch-fid's pt_inception-2015-12-05-*.pth")
    flags.DEFINE_string('dinov2', None, 'dinov2_vitl14_pretrain.pth (torch hub) or a Hugging Face '
                        'Dinov2Model directory / weights file')
    flags.DEFINE_string('dst_dir', 'checkpoints/detectors', 'writes DST_DIR/inception, DST_DIR/dinov2')
    flags.DEFINE_enum('dinov2_interpolation', 'hub', list(INTERPOLATION_OFFSETS),
                      "position-embedding interpolation: 'hub' (EDM2's detector, +0.1 offset) or "
                      "'hf' (transformers' Dinov2Model)")
    flags.DEFINE_bool('overwrite', False, 'replace existing outputs')


@cli_main('convert.detectors', catch=(ValueError,))
def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    if not FLAGS.inception and not FLAGS.dinov2:
        raise app.UsageError('give --inception=PATH and/or --dinov2=PATH')
    for flag in (FLAGS.inception, FLAGS.dinov2):
        if flag and not Path(flag).exists():
            raise app.UsageError(f'{flag} does not exist')
    dst_dir = Path(FLAGS.dst_dir)
    for name in ('inception', 'dinov2'):
        if getattr(FLAGS, name) and (dst_dir / name).exists() and not FLAGS.overwrite:
            raise app.UsageError(f'{dst_dir / name} exists (pass --overwrite to replace it)')
    if FLAGS.inception:
        convert_inception(FLAGS.inception, dst_dir / 'inception', overwrite=FLAGS.overwrite)
        print(f'wrote {dst_dir / "inception"}')
    if FLAGS.dinov2:
        meta = convert_dinov2(FLAGS.dinov2, dst_dir / 'dinov2', interpolation=FLAGS.dinov2_interpolation,
                              overwrite=FLAGS.overwrite)
        print(f'wrote {dst_dir / "dinov2"}: {meta["config"]}')


if __name__ == '__main__':
    define_flags()
    app.run(main)
