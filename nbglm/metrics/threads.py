"""The metrics' threads: one pool kept for the process, and compiled kernels spread over it.

Why not numba's ``prange``: its OpenMP threads spin for a while after every parallel loop, and
took a core from the pool's threads that sort the DE keys next (a small evaluation spent about a
tenth of its time so). The kernels here are plain ``nogil`` loops over one task's share of the
work, run by the pool's threads, which sleep when idle.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numba


def n_threads() -> int:
    """Threads for the metrics' kernels: NUMBA_NUM_THREADS (numba's default: the CPU count), at most
    the CPUs this process may use. Read from numba's config: asking numba itself would start its
    OpenMP threads."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cpus, numba.config.NUMBA_NUM_THREADS))


@functools.cache
def thread_pool(workers: int) -> ThreadPoolExecutor:
    """The process's pool of `workers` threads for the metrics' kernels, kept between calls:
    starting its threads anew took about 1 ms each while the cores were busy, 12 per evaluation of
    a small pair. A task must not wait on work it gives the same pool (nothing here does)."""
    return ThreadPoolExecutor(workers, thread_name_prefix=f"nbglm-metrics-{workers}")


os.register_at_fork(after_in_child=thread_pool.cache_clear)  # a forked child has none of the threads


def per_thread(n_items: int) -> int:
    """Tasks for `n_items` of about equal cost: one per thread, fewer for fewer items, at least one."""
    return max(1, min(n_items, n_threads()))


def on_threads(kernel: Callable[..., None], n_tasks: int, *args: object) -> None:
    """``kernel(task, n_tasks, *args)`` for every task in [0, n_tasks), on the pool (inline when
    there is one thread or one task). `kernel` is compiled with ``nogil=True`` and does its task's
    share of the work: rows ``task * n // n_tasks`` up to the next task's first, for instance."""
    workers = n_threads()
    if workers == 1 or n_tasks == 1:
        for task in range(n_tasks):
            kernel(task, n_tasks, *args)
        return
    list(thread_pool(workers).map(lambda task: kernel(task, n_tasks, *args), range(n_tasks)))
