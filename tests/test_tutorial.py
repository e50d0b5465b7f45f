"""examples/tutorial.py runs end to end (a tiny random network on the CPU): checkpoints, three
methods' images, the side-by-side grid and the scores."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tutorial_runs(tmp_path):
    from PIL import Image
    out = tmp_path / 'tut'
    env = {**os.environ, 'PYTHONPATH': str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / 'examples' / 'tutorial.py'), f'--out={out}'],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'Unable to initialize backend' not in proc.stderr                    # quiet CLIs: WARNING,
    assert re.search(r'^I\d{4} ', proc.stderr, re.M) is None, proc.stderr[:2000]  # no absl INFO lines
    for method in ('none', 'autoguidance', 'insitu'):
        assert len(list((out / method).glob('0000[0-9][0-9].png'))) == 64
    grid = np.asarray(Image.open(out / 'grid.png'))
    assert grid.shape == (4 * 16, 3 * 4 * 16 + 2 * 4, 3)  # three 4×4 grids of 16×16 images, two gaps
    scores = json.loads((out / 'scores.json').read_text())['scores']
    assert set(scores) == {'none', 'autoguidance', 'insitu'} and all(math.isfinite(v) for v in scores.values())
    assert scores['autoguidance'] != scores['none']  # guidance moved the samples: the network's F ≠ 0
    assert str(out / 'grid.png') in proc.stdout and str(out / 'scores.json') in proc.stdout
