"""edm2_jax.seeds: EDM2's seed syntax parsed to ranges (no list built), bounds and repeats refused
with one clear error; process slices as np.array_split's."""
import time
import tracemalloc

import numpy as np
import pytest

from edm2_jax import parallel
from edm2_jax.errors import UserError
from edm2_jax.seeds import MAX_COUNT, SEED_LIMIT, Seeds, format_seeds, parse_seeds


def test_order_len_index_and_format():
    s = parse_seeds('10-12, 3 ,7-8')
    assert list(s) == [10, 11, 12, 3, 7, 8] and len(s) == 6  # the given order, as EDM2
    assert [s[i] for i in range(-6, 6)] == [10, 11, 12, 3, 7, 8] * 2
    assert format_seeds(s) == '10-12,3,7-8' and parse_seeds(format_seeds(s)) == s
    with pytest.raises(IndexError):
        s[6]


def test_large_range_is_not_built():
    tracemalloc.start()
    start = time.perf_counter()
    s = parse_seeds(f'0-{MAX_COUNT - 1}')
    mine = parallel.process_slice(s, 2, 3)
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(s) == MAX_COUNT and elapsed < 0.5 and peak < 1 << 20  # a list would take ~400 MB
    expected = np.array_split(np.arange(MAX_COUNT), 3)[2]
    assert (len(mine), mine[0], mine[-1]) == (len(expected), expected[0], expected[-1])


@pytest.mark.parametrize('text', ['0-6', '5,0-2,9-10', '4', '0-1,3,5,7,9-11,20-29'])
@pytest.mark.parametrize('count', [1, 2, 3, 4, 8])
def test_process_slices_are_array_split(text, count):
    seeds = parse_seeds(text)
    flat = [int(v) for v in text.replace(' ', '').split(',') for v in
            (range(int(v.split('-')[0]), int(v.split('-')[-1]) + 1))]
    for p, expected in enumerate(np.array_split(np.array(flat), count)):
        assert list(parallel.process_slice(seeds, p, count)) == expected.tolist()


@pytest.mark.parametrize('text, message', [
    ('99999999999999999999', 'too large'),
    (f'0-{SEED_LIMIT}', 'too large'),
    ('1' * 5000, 'too large'),                 # no big-int conversion of a 5000-digit number
    ('0-9,x', 'malformed entry'),
    ('5-2', 'empty range'),
    ('', 'malformed entry'),
    ('-1', 'malformed entry'),
    ('0-9,5', 'seed 5 twice'),
    ('10-19,0-10', 'seed 10 twice'),
    ('3,3', 'seed 3 twice'),
    (f'0-{MAX_COUNT}', 'more than'),
    (f'0-{SEED_LIMIT - 1}', 'more than'),
])
def test_bad_seeds_one_error(text, message):
    start = time.perf_counter()
    with pytest.raises(UserError, match=message) as e:
        parse_seeds(text)
    assert time.perf_counter() - start < 0.5
    assert str(e.value).startswith('--seeds: ')


def test_largest_seed_accepted():
    assert list(parse_seeds(f'{SEED_LIMIT - 2}-{SEED_LIMIT - 1}')) == [SEED_LIMIT - 2, SEED_LIMIT - 1]
    assert list(Seeds()) == [] and len(Seeds()) == 0
