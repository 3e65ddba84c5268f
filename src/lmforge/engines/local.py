"""The local engines: a function run over items in this process, or in a pool of worker processes.

``ProcessPool`` starts ``workers`` processes (spawned, not forked: the stage's process may already run
a library's threads, which a fork would copy in a broken state), sends each the function once, and
hands out one item per task, at most ``look_ahead(workers)`` in flight, results in input order.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from lmforge.engines.workers import WorkerSide, in_order, look_ahead, trimmed


class InProcess:
    """The function called here, item by item: for work too small to be worth starting workers."""

    in_process = True

    def __init__(self, function: Callable[[Any], Any]):
        self.function = function
        self.workers = 1

    def map(self, items: Iterable) -> Iterator:
        """``function(item)`` for each item, in order."""
        return trimmed(self.function(item) for item in items)

    def close(self) -> None:
        pass

    def __enter__(self) -> InProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# The function installed in this process when it is a pool worker (by _install).
_worker = WorkerSide()


def _install(function: Callable[[Any], Any]) -> None:
    _worker.install("pool", function)


def _run(item: Any) -> Any:
    return _worker.run(item)


class ProcessPool:
    """The function run in ``workers`` local processes, each sent the function once."""

    in_process = False

    def __init__(self, function: Callable[[Any], Any], workers: int):
        self.workers = workers
        self.pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_install, initargs=(function,))

    def map(self, items: Iterable) -> Iterator:
        """``function(item)`` for each item, computed in the workers, results in input order."""
        return trimmed(in_order(lambda item: self.pool.apply_async(_run, (item,)), lambda result: result.get(),
                                items, look_ahead(self.workers)))

    def close(self) -> None:
        """Stop the workers (at once: an error or an early stop leaves nothing worth finishing)."""
        self.pool.terminate()
        self.pool.join()

    def __enter__(self) -> ProcessPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
