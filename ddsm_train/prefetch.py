"""Bounded prefetching: prepare the next items on background threads while the caller works on
the current one.

Scoring scripts decode and resize images (OpenCV and NumPy release the GIL) while the model runs
on the previous batch; with at most a fixed number of items in flight, memory stays bounded and
results come back in input order, exactly as a plain loop would produce them::

    for x in prefetch_map(load_image, paths, ahead=2 * batch_size, workers=4):
        ...

``ahead=0`` is the plain serial loop (no thread).
"""
from __future__ import annotations

import collections
import itertools
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

__all__ = ["prefetch_map", "default_workers"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


def default_workers(limit: int = 4) -> int:
    """Loader threads for this process: one less than the CPUs it may run on (its affinity;
    one is left to the caller, who feeds the model), at most ``limit``; so 0 (load in the
    caller's thread) on a single CPU, where a loader thread could only compete for it."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    return max(0, min(limit, cpus - 1))


def prefetch_map(fn: Callable[[T], R], items: Iterable[T], ahead: int = 2,
                 workers: int = 1) -> Iterator[R]:
    """``fn(item)`` for each item, in order, computed up to ``ahead`` items in advance.

    Args:
        fn: called once per item on a background thread (it should release the GIL for most of
            its work, as OpenCV decoding and NumPy do, to overlap with the caller).
        items: any iterable; consumed lazily, at most ``ahead`` items beyond the one being
            yielded.
        ahead: items in flight beyond the current one; 0 or ``workers`` 0 computes each item
            in the caller's thread when it is needed (a plain loop).
        workers: background threads.

    Yields:
        ``fn(item)`` in the order of ``items``. An exception raised by ``fn`` is raised here,
        when its item is reached; items after it are not computed if the caller stops.
    """
    items = iter(items)
    if ahead <= 0 or workers <= 0:
        for item in items:
            yield fn(item)
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="prefetch")
    try:
        pending = collections.deque(pool.submit(fn, item)
                                    for item in itertools.islice(items, ahead))
        while pending:
            future = pending.popleft()
            for item in itertools.islice(items, 1):  # keep `ahead` items beyond this one
                pending.append(pool.submit(fn, item))
            yield future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
