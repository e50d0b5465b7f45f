"""Time and peak memory of converting a synthetic full-size EDM2 pickle (a script, not a test).

    python -m convert.bench_memory --preset=img512-s

Writes a float16 snapshot-format pickle of the preset's architecture with random weights (with
torch, through tests/edm2_pickle_fixture.py), then runs `python -m convert.edm2` on it in a fresh
process and reports wall time and the child's peak RSS (VmHWM) (plus the RSS of a child that only imports
the converter, i.e. the fixed cost of Python + jax). Prints one JSON line.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import app, flags

from edm2_jax.config import get_preset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'tests'))
from edm2_pickle_fixture import state_dict_shapes, write_edm2_pickle  # noqa: E402
from convert.torch_names import precond_kwargs  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string('preset', 'img512-s', 'Architecture of the synthetic checkpoint.')
flags.DEFINE_string('workdir', None, 'Where to write the pickle and the output (default: a temp dir '
                    'that is removed afterwards).')
flags.DEFINE_integer('seed', 0, 'Seed of the random weights.')


# Runs a module or code in a child and reports its VmHWM (peak RSS of the child's own address space;
# getrusage would also count the parent's pages at fork time).
_RUNNER = """import atexit, runpy, sys
report, mode, target = sys.argv[1:4]
def write_report():
    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]
    open(report, 'w').write(hwm)
atexit.register(write_report)
sys.argv = [target] + sys.argv[4:]
runpy.run_module(target, run_name='__main__', alter_sys=True) if mode == '-m' else exec(target)
"""


def _child_peak_rss(workdir: Path, mode: str, target: str, *args) -> tuple[float, float]:
    """(wall seconds, peak RSS in GiB) of `python mode target args` in a fresh process."""
    report = workdir / 'vmhwm.txt'
    start = time.perf_counter()
    subprocess.run([sys.executable, '-c', _RUNNER, str(report), mode, target, *args], cwd=REPO,
                   check=True)
    seconds = time.perf_counter() - start
    return seconds, int(report.read_text()) / 2**20  # VmHWM is in KiB


def run(workdir: Path) -> dict:
    config = get_preset(FLAGS.preset)
    rng = np.random.default_rng(FLAGS.seed)
    shapes = state_dict_shapes(config)
    sd = {k: (0.1 * rng.standard_normal(s, np.float32)).astype(np.float16) for k, s in shapes.items()}
    params = sum(v.size for v in sd.values())
    start = time.perf_counter()
    src = write_edm2_pickle(workdir / f'synthetic-{FLAGS.preset}.pkl', sd, precond_kwargs(config))
    write_s = time.perf_counter() - start
    del sd
    base_s, base_rss = _child_peak_rss(workdir, '-c', 'import convert.edm2')
    conv_s, conv_rss = _child_peak_rss(workdir, '-m', 'convert.edm2', f'--src={src}',
                                       f'--dst={workdir / "out"}', '--overwrite')
    return dict(preset=FLAGS.preset, params_M=round(params / 1e6, 1),
                pickle_GiB=round(src.stat().st_size / 2**30, 3),
                float32_GiB=round(params * 4 / 2**30, 3), write_pickle_s=round(write_s, 1),
                convert_s=round(conv_s, 1), convert_peak_rss_GiB=round(conv_rss, 3),
                import_only_s=round(base_s, 1), import_only_peak_rss_GiB=round(base_rss, 3),
                peak_rss_over_float32=round(conv_rss / (params * 4 / 2**30), 2))


def main(argv):
    del argv
    if FLAGS.workdir:
        Path(FLAGS.workdir).mkdir(parents=True, exist_ok=True)
        result = run(Path(FLAGS.workdir))
    else:
        with tempfile.TemporaryDirectory() as d:
            result = run(Path(d))
    print(json.dumps(result))


if __name__ == '__main__':
    app.run(main)
