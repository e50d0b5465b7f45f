"""Property-based fuzzing of the two parsers that read untrusted text and bytes: the seed parser and the
restricted pickle reader. Whatever the input, the outcome is a valid result or one `UserError`; never
another exception, never code from the input run, never memory beyond what the file can hold.

Reproducible (`derandomize=True`) and bounded (a few hundred examples in all, well under 30 s).
"""
import io
import pickle
import pickletools
import re
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import edm2_pickle_fixture as fixture
from convert import pickle_reader, readers
from edm2_jax.errors import UserError
from edm2_jax.seeds import MAX_COUNT, SEED_LIMIT, Seeds, format_seeds, parse_seeds

MiB = 1 << 20


def fuzz(examples):
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ------------------------------------------------------------------------------------------------
# Seeds.

def oracle_ranges(text):
    """EDM2's seed grammar read a second way (split and str methods, not the parser's regex):
    [(low, high), ...] if `text` is a valid seed list within the bounds, else None."""
    pairs = []
    for entry in text.split(','):
        bounds = [b.strip() for b in entry.split('-')]
        if len(bounds) > 2 or not all(b.isdecimal() for b in bounds):
            return None
        low, high = int(bounds[0]), int(bounds[-1])
        if not low <= high < SEED_LIMIT:
            return None
        pairs.append((low, high))
    ordered = sorted(pairs)
    if any(b[0] <= a[1] for a, b in zip(ordered, ordered[1:])):
        return None
    return pairs if sum(high - low + 1 for low, high in pairs) <= MAX_COUNT else None


def check_seeds(text):
    """parse_seeds(text) is the oracle's seeds or a one-line `--seeds:` UserError; returns which."""
    try:
        seeds = parse_seeds(text)
    except UserError as e:
        assert str(e).startswith('--seeds: ') and '\n' not in str(e), str(e)
        return None
    pairs = oracle_ranges(text)
    assert pairs is not None, (text, seeds)
    assert len(seeds) == sum(high - low + 1 for low, high in pairs)
    position = 0
    for low, high in pairs:  # each range's ends at its place (the whole list may be 10**7 long)
        assert (seeds[position], seeds[position + high - low]) == (low, high)
        position += high - low + 1
    if len(seeds) <= 10_000:
        assert list(seeds) == [s for low, high in pairs for s in range(low, high + 1)]
    text_again = format_seeds(seeds)
    assert re.fullmatch(r'[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*', text_again)
    assert parse_seeds(text_again) == seeds
    return seeds


@fuzz(300)
@given(st.text(max_size=60))
def test_any_text_is_seeds_or_one_error(text):
    check_seeds(text)


# Numbers near the bounds, with leading zeros; ASCII digits, so the oracle decides acceptance.
_numbers = st.one_of(st.integers(0, 30), st.integers(SEED_LIMIT - 3, SEED_LIMIT + 3),
                     st.integers(0, 10 ** 25)).map(str)
_number_text = st.tuples(st.sampled_from(['', '0', '000']), _numbers).map(''.join)
_space = st.sampled_from(['', ' ', '\t', '\u00a0', '  '])
_entry = st.one_of(
    st.tuples(_space, _number_text, _space).map(''.join),
    st.tuples(_space, _number_text, _space, st.just('-'), _space, _number_text, _space).map(''.join),
    st.tuples(st.integers(0, 200), st.integers(0, 40)).map(lambda p: f'{p[0]}-{p[0] + p[1]}'),
    st.text(alphabet='0123456789-, x', max_size=8))


@fuzz(300)
@given(st.lists(_entry, min_size=1, max_size=6).map(','.join))
def test_seed_lists_are_accepted_exactly_when_valid(text):
    assert (check_seeds(text) is not None) == (oracle_ranges(text) is not None), text


@fuzz(100)
@given(st.lists(st.tuples(st.integers(0, 1000), st.integers(1, 30)), min_size=1, max_size=5),
       st.integers(0, 200), st.integers(0, 200))
def test_slices_are_list_slices(pairs, start, stop):
    ranges, low = [], 0
    for gap, length in pairs:
        ranges.append(range(low + gap, low + gap + length))
        low += gap + length
    seeds = Seeds(ranges[::-1])
    flat = [s for r in ranges[::-1] for s in r]
    assert list(seeds[start:stop]) == flat[start:stop] and len(seeds[start:stop]) == len(flat[start:stop])
    assert parse_seeds(format_seeds(seeds)) == seeds


# ------------------------------------------------------------------------------------------------
# Pickles: a global that records its calls; the reader must never call it (nor execute module_src).

CALLS = []


def record_call(*args):
    """Reachable by any unrestricted unpickler (this test module is importable by its name)."""
    CALLS.append(args)
    return 'called'


def _global(module, name):
    return b'c' + f'{module}\n{name}\n'.encode()


def _str(s):
    b = s.encode()
    return b'\x8c' + bytes([len(b)]) + b


RECORD = _global(record_call.__module__, record_call.__qualname__)
FORBIDDEN = [RECORD, _global('os', 'system'), _global('builtins', 'eval'),
             _global('builtins', 'getattr'), _global('numpy', 'frombuffer')]
WHITELISTED = [_global(*pair) for pair in [*pickle_reader._OUTER_TYPES, *pickle_reader._OUTER_FUNCTIONS]]


def test_the_recording_payload_is_live():
    """Controls: an ordinary unpickler calls record_call; the restricted reader refuses it."""
    payload = b'\x80\x04' + RECORD + _str('x') + b'\x85R.'
    assert pickle.loads(payload) == 'called' and CALLS == [('x',)]
    CALLS.clear()
    with pytest.raises(pickle_reader.UnsafePickleError, match='forbidden global'):
        pickle_reader.load(io.BytesIO(payload))
    assert CALLS == []


def _tiny_nvidia_pickle(sentinel) -> bytes:
    """A small snapshot in NVIDIA's format (persistent records, a ModuleDict, legacy storage blobs,
    parameters and buffers, numpy arrays in the SD-VAE encoder) whose module_src creates `sentinel`
    if run."""
    src = f'import pathlib\npathlib.Path({str(sentinel)!r}).write_text("module_src ran")\n'
    classes = {name: type(name, (fixture._Persistent, base), {'_module_src': src}) for name, base in
               [('Precond', torch.nn.Module), ('UNet', torch.nn.Module), ('MPConv', torch.nn.Module),
                ('MPFourier', torch.nn.Module), ('StabilityVAEEncoder', object)]}
    rng = np.random.default_rng(0)
    unet = fixture._new(classes['UNet'])
    unet.out_gain = fixture._param(np.float32(0.5), torch.float16)
    unet.enc = torch.nn.ModuleDict({'conv': fixture._mpconv(classes, rng.normal(size=(2, 1, 3, 3)),
                                                            torch.float16)})
    precond = fixture._new(classes['Precond'], init_kwargs=dict(img_resolution=4, img_channels=1,
                                                                 label_dim=0, model_channels=2))
    precond.unet = unet
    precond.logvar_fourier = fixture._fourier(classes, rng.normal(size=3), rng.normal(size=3),
                                              torch.float32)
    with fixture._stand_in_modules():
        data = fixture.EasyDict(encoder=fixture._encoder(classes, 'sd-vae'), ema=precond)
        return pickle.dumps(data, protocol=4)


class Tiny(dict):
    """The tiny snapshot's bytes, its directory and sentinel (a short repr in failure reports)."""

    def __repr__(self):
        return f'Tiny({len(self["data"])} bytes in {self["dir"]})'


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp('fuzz')
    sentinel = d / 'MODULE_SRC_RAN'
    return Tiny(dir=d, sentinel=sentinel, data=_tiny_nvidia_pickle(sentinel))


def _rss_peak() -> int:
    with open('/proc/self/status') as f:
        return int(next(line for line in f if line.startswith('VmHWM')).split()[1]) * 1024


def _reset_rss_peak():
    with open('/proc/self/clear_refs', 'w') as f:  # '5' resets VmHWM to the current RSS (Linux)
        f.write('5')


def check_pickle(data: bytes, tiny) -> readers.Source | None:
    """read_pickle: a Source or one UserError naming the file; nothing run, RSS bounded by the file."""
    path = tiny['dir'] / 'fuzzed.pkl'
    path.write_bytes(data)
    _reset_rss_peak()
    before = _rss_peak()
    try:
        result = readers.read_pickle(path)
    except UserError as e:
        assert str(e).startswith(f'{path}: ') and '\n' not in str(e), str(e)
        result = None
    grown = _rss_peak() - before
    assert grown < 2 * len(data) + 32 * MiB, grown
    assert CALLS == [] and not tiny['sentinel'].exists()
    return result


def test_the_tiny_pickle_is_read(tiny):
    """Control: unmutated, the tiny snapshot gives its tensors and architecture (and a live
    module_src: an ordinary unpickler with the stand-in modules would not run it, NVIDIA's would)."""
    source = check_pickle(tiny['data'], tiny)
    assert sorted(source.state_dict) == ['logvar_fourier.freqs', 'logvar_fourier.phases',
                                         'unet.enc.conv.weight', 'unet.out_gain']
    assert source.state_dict['unet.enc.conv.weight'].shape == (2, 1, 3, 3)
    assert source.architecture == dict(img_resolution=4, img_channels=1, label_dim=0, model_channels=2)
    assert source.decoder.kind == 'sd-vae'
    np.testing.assert_allclose(source.decoder.scale, fixture.VAE_SCALE)
    assert str(tiny['sentinel']) in tiny['data'].decode('latin-1')


@fuzz(150)
@given(st.one_of(st.binary(max_size=200),
                 st.binary(max_size=200).map(lambda b: b'\x80\x04' + b),
                 st.binary(max_size=200).map(lambda b: b'\x80\x02' + b + b'.')))
def test_random_bytes(tiny, data):
    check_pickle(data, tiny)


def _opcode_starts(data: bytes) -> list[int]:
    return [position for _, _, position in pickletools.genops(data)]


@fuzz(250)
@given(st.data())
def test_mutated_snapshot(tiny, draw):
    """Truncations, byte overwrites, insertions and deletions, at bytes or at opcode boundaries."""
    data = bytearray(tiny['data'])
    starts = _opcode_starts(tiny['data'])
    where = st.one_of(st.integers(0, len(data) - 1), st.sampled_from(starts))
    for _ in range(draw.draw(st.integers(1, 4))):
        kind = draw.draw(st.sampled_from(['truncate', 'overwrite', 'insert', 'delete']))
        at = min(draw.draw(where), len(data))
        if kind == 'truncate':
            del data[at:]
        elif kind == 'overwrite':
            patch = draw.draw(st.binary(min_size=1, max_size=8))
            data[at:at + len(patch)] = patch
        elif kind == 'insert':
            data[at:at] = draw.draw(st.one_of(st.binary(min_size=1, max_size=8),
                                              st.sampled_from(FORBIDDEN + WHITELISTED)))
        else:
            del data[at:at + draw.draw(st.integers(1, 64))]
    check_pickle(bytes(data), tiny)


# Opcodes of every kind: atoms, containers, globals (whitelisted and forbidden), calls, memo, stack.
_ATOMS = [b'N', b'\x88', b'\x89', b'K\x00', b'K\x06', b'J\xff\xff\xff\xff', b'\x8a\x01\x80',
          b'G' + struct.pack('>d', 0.5), b'C\x02ab', b'B\xff\xff\xff\x7fab',
          b'\x8e' + struct.pack('<Q', 1 << 33)] + [_str(s) for s in (
              '', 'type', 'class', 'version', 'class_name', 'state', 'Precond', 'ema', '_parameters',
              '_buffers', '_modules', 'numpy.ndarray', 'torch_utils.persistence', 'system', 'os')]
_STRUCTURE = [b'(', b'}', b']', b')', b'\x8f', b't', b'\x85', b'\x86', b'\x87', b'l', b'd', b's',
              b'u', b'a', b'e', b'\x90', b'\x91', b'0', b'1', b'2', b'\x94', b'h\x00', b'h\x01',
              b'q\x00', b'r\x00\x00\x00\x00', b'j\x05\x00\x00\x00']
_CALLS = [b'R', b'b', b'\x81', b'\x92', b'o', b'i' + b'os\nsystem\n', b'\x93', b'Q', b'P1\n',
          b'\x82\x01', b'\x95' + struct.pack('<Q', 1 << 40)]


@fuzz(250)
@given(st.lists(st.sampled_from(_ATOMS + _STRUCTURE + _CALLS + FORBIDDEN + WHITELISTED),
                max_size=24))
def test_random_opcode_sequences(tiny, ops):
    data = b'\x80\x04' + b''.join(ops) + b'.'
    check_pickle(data, tiny)
    try:  # the reader alone: any object, or its own error
        pickle_reader.load(io.BytesIO(data))
    except pickle_reader.PickleFormatError:
        pass
    assert CALLS == []
