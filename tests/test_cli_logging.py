"""Every CLI (through `errors.cli_main`) logs at WARNING unless --verbosity is given: no orbax lines,
no JAX platform probing ("Unable to initialize backend 'tpu'")."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = ['--img_resolution=8', '--img_channels=3', '--model_channels=8', '--channel_mult=1', '--num_blocks=1',
        '--attn_resolutions=', '--channels_per_head=8', '--logvar_channels=8']
INFO = re.compile(r'^I\d{4} ', re.M)  # absl's INFO line prefix


def convert_random(dst, *extra):
    env = {**os.environ, 'PYTHONPATH': str(REPO)}
    proc = subprocess.run([sys.executable, '-m', 'convert.random', f'--dst={dst}', *TINY, *extra], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stderr


@pytest.mark.slow
def test_warning_by_default_info_on_request(tmp_path):
    assert not INFO.search(convert_random(tmp_path / 'quiet'))
    assert INFO.search(convert_random(tmp_path / 'chatty', '--verbosity=0'))  # orbax logs its save
