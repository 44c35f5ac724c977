"""A radix sort of non-negative int64 keys, for the DE engine's gene blocks.

Why not numpy's sort: numpy sorts int64 with a vectorised sort on some x86 CPUs and a scalar one on
others, 4.9 and 58 ns per key on two EPYC machines of the same kind, so the metrics' speed
depended on the processor (``scripts/bench_metrics.py`` prints both sorts' ns per key on the
machine at hand). A radix sort costs about the same everywhere.

Why it is short: the DE keys of one block share their high bits (the block's genes), so only
``key - min`` is sorted, over just the bits that vary, in as few passes of at most
`_MAX_DIGIT_BITS` bits as cover them; a pass whose digit is the same for every key is skipped. A
block larger than `_BUCKET_KEYS` is first split on its top bits (one counting pass) into buckets
that fit in L2, and each bucket is then sorted in cache from its own minimum. Keys that would need
a third pass are sorted in two on their high bits and finished by insertion: what is left out of
order is a few neighbours with the same value and gene (the low bits hold the group and the
value's last bits); a key that would move further than `_INSERTION_REACH` places makes the keys
take every pass instead.

:func:`radix_is_faster` times both sorts once per process, so a CPU whose numpy sort is faster
keeps it.
"""

from __future__ import annotations

import functools
import time

import numba
import numpy as np

_MAX_DIGIT_BITS = 13  # 8,192 counters per pass (64 KiB) stay in L2: two or three passes cover a block
_BUCKET_KEYS = 1 << 15  # keys sorted in cache at once: 256 KiB plus as much scratch, in L2
_INSERTION_KEYS = 32  # below this, counting passes cost more than they save
_INSERTION_BITS = 13  # low bits that may be left to a final insertion pass ...
_INSERTION_REACH = 64  # ... as long as no key has to move further than this
_PROBE_KEYS = 1 << 16  # a typical block's size
_PROBE_BITS = 40  # a typical block's key range


@numba.njit(nogil=True, cache=True)
def _bit_length(x: int) -> int:  # pragma: no cover - compiled
    n = 0
    while x > 0:
        x >>= 1
        n += 1
    return n


@numba.njit(nogil=True, cache=True)
def _min_max(keys):  # pragma: no cover - compiled
    lo, hi = keys[0], keys[0]
    for i in range(1, keys.size):
        lo, hi = min(lo, keys[i]), max(hi, keys[i])
    return lo, hi


@numba.njit(nogil=True, cache=True)
def _insertion_sort(keys, reach):  # pragma: no cover - compiled
    """Insertion-sort `keys`; False (keys still a permutation) as soon as one would move more than
    `reach` places, so nearly sorted keys are finished cheaply and others are left to the passes."""
    for i in range(1, keys.size):
        k = keys[i]
        j = i - 1
        if keys[j] <= k:
            continue
        while j >= 0 and keys[j] > k and j >= i - reach:
            keys[j + 1] = keys[j]
            j -= 1
        keys[j + 1] = k
        if j >= 0 and keys[j] > k:
            return False
    return True


@numba.njit(nogil=True, cache=True)
def _lsd(keys, scratch, lo, bits, skip):  # pragma: no cover - compiled
    """Sort `keys` (all in [lo, lo + 2**bits)) on bits `skip` and up of key - lo by stable passes
    over equal digits, with `scratch` (same size) as the other buffer; returns True when the
    result is in `scratch`. int32 counters where they suffice: 8,192 of them take 32 KiB, L1's size."""
    passes = (bits - skip + _MAX_DIGIT_BITS - 1) // _MAX_DIGIT_BITS
    digit = (bits - skip + passes - 1) // passes
    if keys.size < 2**31:
        return _lsd_passes(keys, scratch, lo, skip, digit, np.zeros((passes, 1 << digit), dtype=np.int32))
    return _lsd_passes(keys, scratch, lo, skip, digit, np.zeros((passes, 1 << digit), dtype=np.int64))


@numba.njit(nogil=True, cache=True)
def _lsd_passes(keys, scratch, lo, skip, digit, counts):  # pragma: no cover - compiled
    """`_lsd`'s passes of `digit` bits (one row of `counts` each). Unsigned indices: numba checks
    a signed index for wrapping around."""
    n = keys.size
    mask = (1 << digit) - 1
    if counts.shape[0] == 2:  # the common case, unrolled
        for i in range(n):
            k = (keys[i] - lo) >> skip
            counts[0, np.uintp(k & mask)] += 1
            counts[1, np.uintp((k >> digit) & mask)] += 1
    else:
        for i in range(n):  # all passes' counts in one read
            k = (keys[i] - lo) >> skip
            for p in range(counts.shape[0]):
                counts[p, np.uintp((k >> (p * digit)) & mask)] += 1
    src, dst, swapped = keys, scratch, False
    for p in range(counts.shape[0]):
        shift, pos = skip + p * digit, counts[p]
        if pos[np.uintp(((src[0] - lo) >> shift) & mask)] == n:  # one digit value: the pass would not move a key
            continue
        total = 0
        for d in range(mask + 1):
            total, pos[d] = total + pos[d], total
        for i in range(n):
            k = src[i]
            d = np.uintp(((k - lo) >> shift) & mask)
            at = pos[d]
            dst[np.uintp(at)] = k
            pos[d] = at + 1
        src, dst, swapped = dst, src, not swapped
    return swapped


@numba.njit(nogil=True, cache=True)
def _sort_in_cache(keys, scratch, lo, bits):  # pragma: no cover - compiled
    """Sort `keys` (all in [lo, lo + 2**bits)) with `scratch`; True when the result is in `scratch`.
    Two passes on the high bits and insertion where three passes would be needed."""
    skip = bits - 2 * _MAX_DIGIT_BITS
    if skip <= 0 or skip > _INSERTION_BITS:
        return _lsd(keys, scratch, lo, bits, 0)
    swapped = _lsd(keys, scratch, lo, bits, skip)
    src, dst = (scratch, keys) if swapped else (keys, scratch)
    if _insertion_sort(src, _INSERTION_REACH):
        return swapped
    return _lsd(src, dst, lo, bits, 0) != swapped


@numba.njit(nogil=True, cache=True)
def sort_keys(keys, scratch):  # pragma: no cover - compiled
    """Sort non-negative int64 `keys`, using `scratch` (at least as many elements); returns True
    when the sorted keys are in ``scratch[:keys.size]`` (and `keys` holds garbage), False when in
    `keys`. Leaving them where the last pass put them saves a copy.

    A block that does not fit in cache is split on its top bits into buckets of about
    `_BUCKET_KEYS` keys first (an MSD counting pass into `scratch`), then each bucket is sorted
    in cache and lands in `keys`.
    """
    if keys.size < 2:
        return False
    lo, hi = _min_max(keys)
    return sort_keys_within(keys, scratch, lo, hi)


@numba.njit(nogil=True, cache=True)
def sort_keys_within(keys, scratch, lo, hi):  # pragma: no cover - compiled
    """`sort_keys` of keys known to lie in [lo, hi] (a DE block's genes bound its keys: finding
    their minimum and maximum took a tenth of the sort of a block on an AVX2 EPYC, which has no
    vector 64-bit min; a block split into buckets still finds them, to split on the bits in use)."""
    n = keys.size
    if n < 2:
        return False
    if lo < 0:
        raise ValueError("radix sort: keys must be non-negative")
    scratch = scratch[:n]
    if hi == lo:
        return False
    if n <= _INSERTION_KEYS:
        _insertion_sort(keys, n)
        return False
    if n <= 2 * _BUCKET_KEYS:
        return _sort_in_cache(keys, scratch, lo, _bit_length(hi - lo))
    lo, hi = _min_max(keys)  # buckets split on the top bits the keys use, not those of the bounds
    if hi == lo:
        return False
    bits = _bit_length(hi - lo)
    top = min(bits, _bit_length((n - 1) // _BUCKET_KEYS))
    shift = bits - top
    edges = np.zeros((1 << top) + 1, dtype=np.intp)
    for i in range(n):
        edges[((keys[i] - lo) >> shift) + 1] += 1
    for d in range(1 << top):
        edges[d + 1] += edges[d]
    pos = edges[:-1].copy()
    for i in range(n):
        k = keys[i]
        d = (k - lo) >> shift
        scratch[pos[d]] = k
        pos[d] += 1
    for d in range(1 << top):  # each bucket sorts from scratch, with keys[bucket] as its scratch
        bucket, other = scratch[edges[d] : edges[d + 1]], keys[edges[d] : edges[d + 1]]
        if bucket.size <= _INSERTION_KEYS:
            _insertion_sort(bucket, bucket.size)
            other[:] = bucket
            continue
        b_lo, b_hi = _min_max(bucket)
        if b_hi == b_lo or not _sort_in_cache(bucket, other, b_lo, _bit_length(b_hi - b_lo)):
            other[:] = bucket
    return False


@numba.njit(nogil=True, cache=True)
def radix_sort(keys, scratch):  # pragma: no cover - compiled
    """Sort non-negative int64 `keys` in place; `scratch` has at least as many elements."""
    if sort_keys(keys, scratch):
        keys[:] = scratch[: keys.size]


@functools.cache
def radix_is_faster() -> bool:
    """Whether :func:`radix_sort` beats numpy's sort on this CPU: both sort the same typical block
    (65,536 random 40-bit keys) three times, interleaved; the best time of each decides."""
    keys = np.random.default_rng(0).integers(0, 1 << _PROBE_BITS, _PROBE_KEYS, dtype=np.int64)
    scratch = np.empty_like(keys)
    radix_sort(keys.copy(), scratch)  # compiled or loaded from numba's cache outside the timing
    best = {"numpy": np.inf, "radix": np.inf}
    for _ in range(3):
        for name in best:
            work = keys.copy()
            start = time.perf_counter()
            if name == "numpy":
                work.sort()
            else:
                radix_sort(work, scratch)
            best[name] = min(best[name], time.perf_counter() - start)
    return best["radix"] < best["numpy"]
