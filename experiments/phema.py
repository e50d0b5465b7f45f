r"""Post-hoc EMA reconstruction (edm2-spec §6.1): networks of any EMA length from a run's snapshots.

    python -m experiments.phema --in=$HOME/.cache/edm2-jax/fmnist/fmnist-main --std=0.07,0.12 --out=nets

writes one checkpoint.load-able directory per σ_rel, `<out>/network-<σ_rel:.3f>` (with --time,
`<out>/network-<time:012d>-<σ_rel:.3f>`), reconstructed at the latest snapshot time or at --time
(images; must be a snapshot time) from every snapshot up to it.

--in is a run directory of experiments.train or a folder of NVIDIA's EDM2 raw snapshots
(`<name>-<kimg:07d>-<σ_rel:.3f>.pkl`, read with the restricted unpickler; `convert.raw_snapshots`).
A guide from the training history (method 'history') is such an export at a much shorter σ_rel
than the main network's, or at an early --time (e.g. 1/8 or 1/4 of the training):

    python -m experiments.phema --in=raw/edm2-img512-s --std=0.025 --time=268435456 --out=guides
"""
from __future__ import annotations

from pathlib import Path

from absl import app, flags

from edm2_jax.errors import cli_main

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The CLI flags (defined only when run as a script: importing the module defines none)."""
    flags.DEFINE_string('in', None, 'Run directory of experiments.train (holding snapshots/), or a '
                        'folder of NVIDIA\'s EDM2 raw-snapshot pickles.')
    flags.DEFINE_list('std', None, 'Target EMA lengths σ_rel, e.g. 0.07,0.12.')
    flags.DEFINE_integer('time', None, 'Reconstruct at this many training images (a snapshot time; '
                         'default the latest).')
    flags.DEFINE_string('out', None, 'Output directory for the networks.')
    flags.DEFINE_bool('overwrite', False, 'Replace existing network directories.')


def resolve_settings(f) -> dict:
    """Checked settings (before any snapshot is read), or ValueError."""
    from edm2_jax.ema import sigma_rel_to_gamma
    run = getattr(f, 'in')  # 'in' is a Python keyword
    if run is None or f.out is None or not f.std:
        raise ValueError('give --in (a run directory), --std (EMA lengths) and --out')
    try:
        stds = [float(v) for v in f.std]
    except ValueError:
        raise ValueError(f'--std: expected numbers, got {",".join(f.std)!r}') from None
    if len({f'{s:.3f}' for s in stds}) != len(stds):
        raise ValueError(f'--std lists a value twice (to 3 decimals): {",".join(f.std)}')
    for s in stds:
        sigma_rel_to_gamma(s)  # ValueError names the valid range
    if not Path(run).is_dir():
        raise ValueError(f'--in {run} is not a directory')
    from convert.raw_snapshots import list_raw_snapshots
    raw = bool(list_raw_snapshots(run))
    if raw and (Path(run) / 'snapshots').is_dir():
        raise ValueError(f'--in {run} holds both a run\'s snapshots/ and NVIDIA raw snapshots; give one')
    from edm2_jax.train_state import network_dir_name
    out = Path(f.out)
    names = [out / network_dir_name(s, f.time) for s in stds]
    clash = [str(p) for p in names if p.exists()]
    if clash and not f.overwrite:
        raise ValueError(f'{", ".join(clash)} exist (pass --overwrite to replace)')
    return dict(run=Path(run), stds=stds, time=f.time, out=out, overwrite=f.overwrite, raw=raw)


def reconstruct(s: dict) -> dict[float, Path]:
    """Reconstructs every σ_rel of `s` and writes them; returns {σ_rel: directory}."""
    from edm2_jax import train_state
    targets = {s_rel: s['out'] / train_state.network_dir_name(s_rel, s['time']) for s_rel in s['stds']}
    if not s.get('raw'):
        return train_state.export_posthoc(s['run'], targets, t=s['time'], overwrite=s['overwrite'])
    from convert.raw_snapshots import RawSnapshots
    raw = RawSnapshots(s['run'])
    return train_state.export_posthoc(s['run'], targets, t=s['time'], overwrite=s['overwrite'],
                                      snapshots=raw.snapshots, load=raw.load, decoder=lambda: raw.decoder)


@cli_main('phema', catch=(ValueError, FileNotFoundError, FileExistsError))
def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    written = reconstruct(resolve_settings(FLAGS))
    for sigma_rel, path in written.items():
        print(f'phema: σ_rel {sigma_rel:.3f} → {path}')


if __name__ == '__main__':
    define_flags()
    app.run(main)
