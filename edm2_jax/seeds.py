"""Seed lists as EDM2 writes them ('0-49999', '1,5,10-19'), held as ranges: '0-9999999' costs a few
bytes, not a list of ten million ints, and is checked before anything is built.

Bounds: a seed lies in [0, 2**32) — EDM2 (and `sampling.seed_keys`) use seed mod 2**32, so a larger
seed would silently repeat the image of a smaller one; a run has at most MAX_COUNT seeds (its list
of unfinished seeds is an int64 array: 80 MB at the bound). No seed may appear twice.
"""
from __future__ import annotations

import bisect
import re
from typing import Iterator, Sequence

from edm2_jax.errors import UserError

SEED_LIMIT = 2**32          # seeds lie in [0, SEED_LIMIT)
MAX_COUNT = 10_000_000      # seeds per run
_PART = re.compile(r'\s*(\d+)\s*(?:-\s*(\d+)\s*)?')


class Seeds(Sequence[int]):
    """An ordered sequence of distinct seeds stored as ranges: len, iteration in order, indexing and
    contiguous slicing (a process's share) without building the list."""

    def __init__(self, ranges: Sequence[range] = ()):
        self.ranges = tuple(r for r in ranges if len(r))
        self._starts = [0]  # position of each range's first seed
        for r in self.ranges:
            self._starts.append(self._starts[-1] + len(r))

    def __len__(self) -> int:
        return self._starts[-1]

    def __iter__(self) -> Iterator[int]:
        for r in self.ranges:
            yield from r

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise ValueError('Seeds slices are contiguous (step 1)')
            return Seeds(self._cut(start, stop))
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f'seed index {index} out of range for {n} seeds')
        index %= n
        k = bisect.bisect_right(self._starts, index) - 1
        return self.ranges[k][index - self._starts[k]]

    def _cut(self, start: int, stop: int) -> list[range]:
        parts = []
        for r, first in zip(self.ranges, self._starts):
            lo, hi = max(start - first, 0), min(stop - first, len(r))
            if lo < hi:
                parts.append(r[lo:hi])
        return parts

    def __eq__(self, other) -> bool:
        return isinstance(other, Seeds) and list(self.ranges) == list(other.ranges)

    def __repr__(self) -> str:
        return f"Seeds({format_seeds(self)!r})"


def format_seeds(seeds: Seeds) -> str:
    """The inverse of parse_seeds: '0-3,7'."""
    return ','.join(f'{r.start}' if len(r) == 1 else f'{r.start}-{r[-1]}' for r in seeds.ranges)


def _number(digits: str, text: str) -> int:
    # Compare the digits before int(): a thousand-digit "seed" must not cost a big-int conversion.
    if len(digits.lstrip('0')) > len(str(SEED_LIMIT)) or int(digits) >= SEED_LIMIT:
        raise UserError(f'seed {digits} in {text!r} is too large', where='--seeds',
                        fix=f'seeds lie in [0, {SEED_LIMIT}): EDM2 takes seeds mod 2**32')
    return int(digits)


def parse_seeds(text: str) -> Seeds:
    """'0-3,7,10-11' → Seeds of 0, 1, 2, 3, 7, 10, 11 in that order (EDM2's parse_int_list);
    malformed entries, empty ranges, too large seeds, repeated seeds and more than MAX_COUNT seeds
    are a UserError."""
    text = str(text)
    ranges = []
    for part in text.split(','):
        m = _PART.fullmatch(part)
        if not m:
            raise UserError(f'malformed entry {part!r} in {text!r}', where='--seeds',
                            fix='expected e.g. 0-49999 or 1,5,10-19')
        lo = _number(m[1], text)
        hi = lo if m[2] is None else _number(m[2], text)
        if hi < lo:
            raise UserError(f'empty range {part.strip()!r}', where='--seeds', fix='write low-high')
        ranges.append(range(lo, hi + 1))
    ordered = sorted(ranges, key=lambda r: r.start)
    for a, b in zip(ordered, ordered[1:]):
        if b.start <= a[-1]:
            raise UserError(f'{text!r} lists seed {b.start} twice', where='--seeds',
                            fix='make the ranges disjoint')
    count = sum(len(r) for r in ranges)
    if count > MAX_COUNT:
        raise UserError(f'{count} seeds, more than {MAX_COUNT:,} per run', where='--seeds',
                        fix='split the seeds over several runs into the same --outdir')
    return Seeds(ranges)
