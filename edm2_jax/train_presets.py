"""Training presets: the four small Fashion-MNIST runs of the guidance study and EDM2's ImageNet
configurations (edm2-spec §2.1; listed for reference and accelerator use, not trained here).

Each preset is a `training.TrainConfig`. Beside it: the data it trains on by default (`PRESET_DATA`,
None = give --data) and the EMA length(s) σ_rel exported by post-hoc reconstruction at the end of a run
(`EXPORT_SIGMA_RELS`).

Fashion-MNIST presets (16×16, area-downsampled from 28×28; pixel space, 1 channel). Sizes were chosen
by measured step time on a shared 2-core CPU (docs/training.md): the same net at 32×32 took ~8× longer
per step, far beyond a ~10-minute budget per run; 500 steps of 128 images (~1 epoch) fit it when the
machine is not heavily shared.
  fmnist-main       class-conditional main model, no dropout
  fmnist-main-drop  the same with dropout 0.1 (the network for in-situ / dropout guidance)
  fmnist-guide      autoguidance guide: half the width, a quarter of the training
  fmnist-uncond     label_dim 0 (the unconditional model for classifier-free guidance)
"""
from __future__ import annotations

from edm2_jax.config import PRESETS as NETWORK_PRESETS, EDM2Config
from edm2_jax.training import TrainConfig

MI = 1 << 20

# ---------------------------------------------------------------------------------------------------
# EDM2 ImageNet (edm2-spec §2.1): batch 2048, lr warm-up over 10 M images, decay t_ref in batches of 2048,
# snapshots every 8 Mi images, training states every 128 Mi.

# size: (α_ref, duration in Mi images) for img512 and img64 (None: no such preset).
_IMG512 = {'xxs': (0.0170, 2048), 'xs': (0.0120, 2048), 's': (0.0100, 2048), 'm': (0.0090, 2048),
           'l': (0.0080, 1792), 'xl': (0.0070, 1280), 'xxl': (0.0065, 896)}
_IMG64 = {'xs': (0.0120, 1024), 's': (0.0100, 1024), 'm': (0.0090, 2048), 'l': (0.0080, 1024),
          'xl': (0.0070, 640)}


def _imagenet(network: EDM2Config, lr_ref: float, duration_mi: int, decay_batches: int, p_mean: float,
              p_std: float) -> TrainConfig:
    return TrainConfig(network=network, batch_size=2048, duration=duration_mi * MI, lr_ref=lr_ref,
                       lr_decay_images=decay_batches * 2048, lr_warmup_images=10_000_000, p_mean=p_mean,
                       p_std=p_std, dropout=network.dropout, snapshot_every=8 * MI, checkpoint_every=128 * MI)


def _imagenet_presets() -> dict[str, TrainConfig]:
    out = {}
    for size, (lr, mi) in _IMG512.items():
        for suffix in ('', '-uncond'):
            name = f'img512-{size}{suffix}'
            out[name] = _imagenet(NETWORK_PRESETS[name], lr, mi, 70000, -0.4, 1.0)
    for size, (lr, mi) in _IMG64.items():
        name = f'img64-{size}'
        out[name] = _imagenet(NETWORK_PRESETS[name], lr, mi, 35000, -0.8, 1.6)
    return out


# ---------------------------------------------------------------------------------------------------
# Fashion-MNIST.

FMNIST_RESOLUTION = 16


def _fmnist_network(label_dim: int = 10, model_channels: int = 32) -> EDM2Config:
    return EDM2Config(img_resolution=FMNIST_RESOLUTION, img_channels=1, label_dim=label_dim,
                      model_channels=model_channels, channel_mult=(1, 2, 2), num_blocks=1,
                      attn_resolutions=(), channels_per_head=32, logvar_channels=32)


def _fmnist(network: EDM2Config, *, duration: int, dropout: float = 0.0, lr_ref: float = 0.01,
            batch_size: int = 128, decay_images: int = 160 * 128) -> TrainConfig:
    """Short-run schedule: no warm-up, inverse-sqrt decay after 160 steps (EDM2's ImageNet values
    assume ~10⁶ steps); EDM2 img64's pixel-space noise distribution (P_mean −0.8, P_std 1.6);
    snapshots every ~1/16 of the run, states every ~1/8."""
    return TrainConfig(network=network, batch_size=batch_size, duration=duration, lr_ref=lr_ref,
                       lr_decay_images=decay_images, lr_warmup_images=0, p_mean=-0.8, p_std=1.6,
                       dropout=dropout, snapshot_every=max(duration // 16 // batch_size, 1) * batch_size,
                       checkpoint_every=max(duration // 8 // batch_size, 1) * batch_size)


FMNIST_DURATION = 500 * 128  # images: 500 steps, ~1.07 epochs


def _fmnist_presets() -> dict[str, TrainConfig]:
    return {
        'fmnist-main': _fmnist(_fmnist_network(), duration=FMNIST_DURATION),
        'fmnist-main-drop': _fmnist(_fmnist_network().replace(dropout=0.1), duration=FMNIST_DURATION,
                                    dropout=0.1),
        'fmnist-guide': _fmnist(_fmnist_network(model_channels=16), duration=FMNIST_DURATION // 4),
        'fmnist-uncond': _fmnist(_fmnist_network(label_dim=0), duration=FMNIST_DURATION),
    }


TRAIN_PRESETS: dict[str, TrainConfig] = {**_fmnist_presets(), **_imagenet_presets()}

PRESET_DATA: dict[str, str | None] = {
    name: ('fashion-mnist' if name.startswith('fmnist-') else None) for name in TRAIN_PRESETS}

# One network per run (experiments.study picks <run>/network-*/ without further flags); other lengths:
# python -m experiments.phema.
EXPORT_SIGMA_RELS: dict[str, tuple[float, ...]] = {name: (0.10,) for name in TRAIN_PRESETS}

