"""Work on items in worker processes, ahead of the caller: the decoder of every bulk run (segment, eval, bench).

:func:`map_in_workers` maps a picklable per-item function over a sequence in ``N`` processes (torch's DataLoader:
each worker prepares whole batches, two per worker are kept ready while the caller uses the current one), in
input order, with every failure turned into a record. Its workers end with the process that started them,
however it ends (:func:`die_with_parent`): a killed run never leaves a worker blocked on a pipe nobody reads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar

import torch

from ..inference.windows import single_threaded_opencv

__all__ = ["map_in_workers", "die_with_parent"]

T = TypeVar("T")
R = TypeVar("R")

_PR_SET_PDEATHSIG = 1


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _prctl_pdeathsig() -> bool:
    """Ask Linux to SIGKILL this process when the thread that forked it ends; whether that worked."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int, interval: float) -> None:
    while os.getppid() == parent:
        time.sleep(interval)
    _kill_self()


def die_with_parent(parent: int, use_prctl: bool = True, interval: float = 0.5) -> None:
    """Make this (worker) process end when ``parent`` ends, even by ``kill -9``.

    On Linux the kernel sends SIGKILL at the parent's death (``prctl(PR_SET_PDEATHSIG)``); elsewhere, or when
    that call fails, a daemon thread checks every ``interval`` seconds whether the parent is still ours. A
    worker whose parent is already gone when this runs ends at once. Linux sends the signal when the *thread*
    that started the worker ends: iterate :func:`map_in_workers` from one thread that outlives the iteration.

    Args:
        parent: the pid of the process that started this one.
        use_prctl: try ``prctl`` first (``False``: the watching thread only).
        interval: seconds between the watching thread's checks.
    """
    if not (use_prctl and _prctl_pdeathsig()):
        threading.Thread(target=_watch_parent, args=(parent, interval), daemon=True, name="gclip-parent").start()
    if os.getppid() != parent:  # the parent died before the signal was armed
        _kill_self()


def _init_worker(main: int, worker_id: int) -> None:  # noqa: ARG001 - DataLoader's worker_init_fn signature
    """Bind a worker's life to its parent: the caller's process, or the fork server that started it (which
    ends with the caller)."""
    parent = os.getppid()
    if parent != main:
        try:
            os.kill(main, 0)
        except ProcessLookupError:  # the caller is gone already
            _kill_self()
    die_with_parent(parent)


class _Mapped(torch.utils.data.Dataset, Generic[T, R]):
    """``fn`` over ``items`` as a Dataset; an exception of ``fn`` becomes ``failure(item, exception)``."""

    def __init__(self, fn: Callable[[T], R], items: Sequence[T], failure: Callable[[T, Exception], R]) -> None:
        self.fn, self.items, self.failure = fn, list(items), failure

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> R:
        item = self.items[index]
        try:
            return self.fn(item)
        except Exception as e:  # noqa: BLE001 - one bad item never stops the map
            return self.failure(item, e)


def _as_list(batch: list[R]) -> list[R]:
    return batch


def map_in_workers(
    fn: Callable[[T], R],
    items: Sequence[T],
    failure: Callable[[T, Exception], R],
    batch_size: int = 1,
    workers: int = 0,
) -> Iterator[list[R]]:
    """``fn(item)`` for every item, ``batch_size`` results at a time, in input order, computed ahead in workers.

    Each worker process computes whole batches and keeps up to two ready while the caller works on the current
    one, so decoding overlaps with the model. The workers die with this process (:func:`die_with_parent`) and
    are shut down when the iterator is exhausted or dropped.

    Args:
        fn: the per-item work (picklable: a module-level function or an instance of a module-level class).
        items: the inputs (picklable).
        failure: builds the record of an item whose ``fn`` raised, from the item and the exception (picklable).
        batch_size: results per yielded list (the last may be shorter).
        workers: worker processes (``0``: compute in this process, batch by batch).

    Yields:
        Lists of ``fn`` results (or ``failure`` records), in the order of ``items``.

    >>> list(map_in_workers(abs, [-1, 2, -3], lambda x, e: None, batch_size=2))
    [[1, 2], [3]]
    """
    workers = max(0, workers)
    single_threaded_opencv()  # before the workers are forked
    loader = torch.utils.data.DataLoader(
        _Mapped(fn, items, failure),
        batch_size=max(1, batch_size),
        shuffle=False,
        num_workers=workers,
        collate_fn=_as_list,
        prefetch_factor=2 if workers else None,
        worker_init_fn=functools.partial(_init_worker, os.getpid()) if workers else None,
        persistent_workers=False,
    )
    yield from loader
