"""How many CPUs deita-hub's own threads may use, and a map over them that keeps the order."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor


def cores() -> int:
    """The CPUs this process may run on (its affinity mask, which containers and `taskset` narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def ordered_map(function: Callable, items: Iterable, threads: int | None = None) -> Iterator:
    """`map(function, items)` on `threads` threads (default: `cores()`), results in order, at most `threads` of
    them computed ahead of the consumer (so a slow consumer holds a few results, not all). For work that releases
    the GIL (Arrow, numpy, hashlib on large buffers). Stopping early cancels what has not started."""
    threads = cores() if threads is None else threads
    if threads <= 1:
        yield from map(function, items)
        return
    items = iter(items)
    with ThreadPoolExecutor(threads, thread_name_prefix="deita-hub") as pool:
        pending: list[Future] = []
        try:
            for item in items:
                pending.append(pool.submit(function, item))
                if len(pending) > threads:
                    yield pending.pop(0).result()
            while pending:
                yield pending.pop(0).result()
        finally:
            for future in pending:
                future.cancel()
