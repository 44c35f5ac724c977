"""Large work arrays lent from one evaluation to the next.

Why: the DE keys and the normalised values of a VCC-size file are 0.5 GB and 0.3 GB. A fresh
array of that size pays its page faults on every call, 0.1-0.3 s here, and up to 1 s when the
kernel compacts memory for huge pages; a sweep evaluates many predictions of one size, so the
arrays are kept (one per name, the largest asked for) and lent again. A name already lent, to
another thread, gets a fresh array.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

_lock = threading.Lock()
_spare: dict[str, np.ndarray] = {}


@contextmanager
def borrowed(name: str, nbytes: int) -> Iterator[np.ndarray]:
    """`nbytes` bytes (uint8, contents undefined, aligned for any dtype's ``view``), valid inside
    the block."""
    with _lock:
        base = _spare.pop(name, None)
    if base is None or base.size < nbytes:
        base = np.empty(nbytes, dtype=np.uint8)
    try:
        yield base[:nbytes]
    finally:
        with _lock:
            kept = _spare.get(name)
            if kept is None or kept.size < base.size:
                _spare[name] = base
