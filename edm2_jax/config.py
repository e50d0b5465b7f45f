"""EDM2 architecture configuration, presets (edm2-spec §2.1) and the block layout of the U-Net (edm2-spec §1.5).

`block_specs(config)` is the single source of truth for module names, widths, resampling and
attention heads; the network, the converter and the guidance code (which blocks to perturb, where a
shared prefix ends) all read it.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import NamedTuple

from edm2_jax.errors import UserError


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _matches(value, annotation) -> bool:
    """Whether a JSON value fits a field annotation: int, float (ints too), str, bool, X | None,
    tuple[X, ...] (a list or tuple); other annotations (nested configs) are checked by their class."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is tuple:
        return isinstance(value, (list, tuple)) and all(_matches(v, args[0]) for v in value)
    if annotation is type(None):
        return value is None
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return _is_number(value)
    if annotation in (str, bool):
        return isinstance(value, annotation)
    return True


def check_fields(cls, d, where: str | None = None) -> None:
    """Refuses a `d` that is not a dict, keys that are not fields of the dataclass `cls` (a config
    from another version, a typo), missing required fields, and values of the wrong JSON type — each
    naming the field (as `where.field`; `where` defaults to the class name)."""
    name = where or cls.__name__
    if not isinstance(d, dict):
        raise UserError(f'expected an object of fields, got {type(d).__name__}', where=name)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise UserError(f'unknown {cls.__name__} fields: {unknown}', where=name)
    missing = [k for k, f in fields.items() if k not in d and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise UserError(f'missing required fields {missing}', where=name)
    hints = typing.get_type_hints(cls)
    for key, value in d.items():
        if not _matches(value, hints[key]):
            raise UserError(f'must be {_type_name(hints[key])}, got {value!r} ({type(value).__name__})',
                            where=f'{name}.{key}')


def _type_name(annotation) -> str:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is tuple:
        return f'a list of {_type_name(args[0])}'
    if args:
        return ' or '.join(_type_name(a) for a in args)
    return 'null' if annotation is type(None) else annotation.__name__


@dataclasses.dataclass(frozen=True)
class EDM2Config:
    """Constructor arguments of EDM2's `Precond` + `UNet` + `Block` (edm2-spec §1.4–1.6).

    `dropout` records the rate the network was trained with; inference never applies it unless the
    caller asks (dropout is a call-time argument of `Network`).
    """
    img_resolution: int
    img_channels: int
    label_dim: int = 0
    model_channels: int = 192
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    channel_mult_noise: int | None = None
    channel_mult_emb: int | None = None
    num_blocks: int = 3
    attn_resolutions: tuple[int, ...] = (16, 8)
    label_balance: float = 0.5
    concat_balance: float = 0.5
    channels_per_head: int = 64
    res_balance: float = 0.3
    attn_balance: float = 0.3
    clip_act: float | None = 256.0
    sigma_data: float = 0.5
    logvar_channels: int = 128
    dropout: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, 'channel_mult', tuple(int(m) for m in self.channel_mult))
        object.__setattr__(self, 'attn_resolutions', tuple(int(r) for r in self.attn_resolutions))
        problems = []
        if self.img_resolution < 1 or self.img_resolution % (1 << (len(self.channel_mult) - 1)):
            problems.append(f'img_resolution={self.img_resolution} must be divisible by '
                            f'2**(len(channel_mult)-1)={1 << (len(self.channel_mult) - 1)}')
        if not self.channel_mult:
            problems.append('channel_mult must not be empty')
        for name in ('img_channels', 'model_channels', 'channels_per_head', 'logvar_channels'):
            if getattr(self, name) < 1:
                problems.append(f'{name} must be >= 1, got {getattr(self, name)}')
        if self.label_dim < 0 or self.num_blocks < 0:
            problems.append('label_dim and num_blocks must be >= 0')
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f'dropout must be in [0, 1), got {self.dropout}')
        if problems:
            raise ValueError('invalid EDM2Config: ' + '; '.join(problems))

    @property
    def block_channels(self) -> tuple[int, ...]:
        return tuple(self.model_channels * m for m in self.channel_mult)

    @property
    def noise_channels(self) -> int:
        if self.channel_mult_noise is not None:
            return self.model_channels * self.channel_mult_noise
        return self.block_channels[0]

    @property
    def emb_channels(self) -> int:
        if self.channel_mult_emb is not None:
            return self.model_channels * self.channel_mult_emb
        return max(self.block_channels)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str | None = None) -> EDM2Config:
        """From `to_dict`'s output (e.g. JSON); UserError naming the field (prefixed by `where`)."""
        check_fields(cls, d, where)
        return cls(**d)

    def replace(self, **changes) -> EDM2Config:
        return dataclasses.replace(self, **changes)


class BlockSpec(NamedTuple):
    """One U-Net module in execution order. `kind` is 'conv' (the stem) or 'block'."""
    name: str           # torch module name, e.g. 'enc.16x16_block0', 'dec.8x8_in0'
    index: int          # position in execution order (also the dropout key stream of the block)
    kind: str           # 'conv' | 'block'
    flavor: str         # 'enc' | 'dec'
    resample: str       # 'keep' | 'down' | 'up'
    in_channels: int    # channels entering the module (after the skip concatenation for dec blocks)
    out_channels: int
    num_heads: int      # 0 = no attention
    takes_skip: bool    # dec '*_block*' modules concatenate a skip first
    resolution: int     # spatial size of the module's output

    @property
    def has_conv_skip(self) -> bool:
        return self.kind == 'block' and self.in_channels != self.out_channels


def block_specs(config: EDM2Config) -> tuple[BlockSpec, ...]:
    """All encoder then decoder modules, in the order the forward pass runs them (edm2-spec §1.5)."""
    specs = []
    cblock = config.block_channels

    def heads(out_ch, attention):
        return out_ch // config.channels_per_head if attention else 0

    def add(name, kind, flavor, resample, cin, cout, num_heads=0, takes_skip=False):
        res = int(name.split('.')[1].split('x')[0])
        specs.append(BlockSpec(name, len(specs), kind, flavor, resample, cin, cout, num_heads,
                               takes_skip, res))

    skips = []
    cout = config.img_channels + 1
    for level, channels in enumerate(cblock):
        res = config.img_resolution >> level
        if level == 0:
            cin, cout = cout, channels
            add(f'enc.{res}x{res}_conv', 'conv', 'enc', 'keep', cin, cout)
        else:
            add(f'enc.{res}x{res}_down', 'block', 'enc', 'down', cout, cout)
        skips.append(cout)
        for i in range(config.num_blocks):
            cin, cout = cout, channels
            add(f'enc.{res}x{res}_block{i}', 'block', 'enc', 'keep', cin, cout,
                heads(cout, res in config.attn_resolutions))
            skips.append(cout)
    for level in reversed(range(len(cblock))):
        res = config.img_resolution >> level
        if level == len(cblock) - 1:
            add(f'dec.{res}x{res}_in0', 'block', 'dec', 'keep', cout, cout, heads(cout, True))
            add(f'dec.{res}x{res}_in1', 'block', 'dec', 'keep', cout, cout)
        else:
            add(f'dec.{res}x{res}_up', 'block', 'dec', 'up', cout, cout)
        for i in range(config.num_blocks + 1):
            cin, cout = cout + skips.pop(), cblock[level]
            add(f'dec.{res}x{res}_block{i}', 'block', 'dec', 'keep', cin, cout,
                heads(cout, res in config.attn_resolutions), takes_skip=True)
    return tuple(specs)


def _preset(resolution, channels, label_dim, model_channels, dropout):
    return EDM2Config(img_resolution=resolution, img_channels=channels, label_dim=label_dim,
                      model_channels=model_channels, dropout=dropout)


_SIZES = {'xxs': (64, 0.0), 'xs': (128, 0.0), 's': (192, 0.0), 'm': (256, 0.1), 'l': (320, 0.1),
          'xl': (384, 0.1), 'xxl': (448, 0.1)}

PRESETS: dict[str, EDM2Config] = {}
for _size, (_mc, _p) in _SIZES.items():
    # ImageNet-512 models work on 64x64x4 SD-VAE latents; ImageNet-64 models on 64x64 RGB pixels.
    PRESETS[f'img512-{_size}'] = _preset(64, 4, 1000, _mc, _p)
    PRESETS[f'img512-{_size}-uncond'] = _preset(64, 4, 0, _mc, _p)
    if _size not in ('xxs', 'xxl'):
        PRESETS[f'img64-{_size}'] = _preset(64, 3, 1000, _mc, _p)
del _size, _mc, _p


def get_preset(name: str) -> EDM2Config:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f'unknown preset {name!r}; known presets: {", ".join(sorted(PRESETS))}')
