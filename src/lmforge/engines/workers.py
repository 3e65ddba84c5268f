"""What every engine shares: how many workers, results in input order with bounded look-ahead, and the
worker side of a task (one function installed per process, memory given back as tasks go by).

An engine runs one *function*, handed to it by a stage, over a stream of *items*, and gives back
``function(item)`` for each item in input order. The function must be picklable (a module-level
function, a ``functools.partial`` of one, or an instance of a module-level class): it is sent to each
worker process once, not once per task, so it may keep what it loads (a tokenizer, say) on itself.
Nothing here knows what the function does.
"""

from __future__ import annotations

import ctypes
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

# Tasks (and results) between two release_freed_memory calls, in a worker and in the stage's process.
TRIM_EVERY = 16

# One worker per core already: a library's own thread pool inside each worker would only
# oversubscribe the cores (HuggingFace tokenizers starts one per process unless told not to).
_WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false"}


def default_workers() -> int:
    """The cores this process may use (its CPU affinity where the system has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def workers_of(data_cfg) -> int:
    """``data.workers``, or every core this process may use when it is null or 0."""
    return int(data_cfg.get("workers") or default_workers())


def look_ahead(workers: int) -> int:
    """Tasks in flight at most: enough to keep ``workers`` busy while results are taken in order."""
    return 2 * workers + 2


def release_freed_memory() -> None:
    """Give the C heap's free memory back to the system (glibc only; elsewhere nothing).

    Task after task of megabyte strings and arrays, glibc keeps what Python frees and resident
    memory creeps up by about 10% of the text handled; trimming keeps it flat.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def in_order(submit: Callable[[Any], Any], collect: Callable[[Any], Any], items: Iterable, ahead: int,
             cancel: Callable[[Any], None] | None = None) -> Iterator:
    """``collect(submit(item))`` for each item, in input order, with at most ``ahead`` submitted and not
    yet collected: the input is read only as fast as results are taken, so memory stays bounded
    (``Pool.imap`` would read the whole input ahead of the workers). On an error or an early stop,
    ``cancel`` is called on every task still pending."""
    pending: deque = deque()
    try:
        for item in items:
            pending.append(submit(item))
            if len(pending) >= ahead:
                yield collect(pending.popleft())
        while pending:
            yield collect(pending.popleft())
    finally:
        if cancel is not None:
            for handle in pending:
                cancel(handle)


def trimmed(results: Iterable) -> Iterator:
    """``results`` passed through, the stage's process giving freed memory back every ``TRIM_EVERY``."""
    for number, result in enumerate(results, 1):
        if number % TRIM_EVERY == 0:
            release_freed_memory()
        yield result


class WorkerSide:
    """The functions installed in one worker process (a pool process or a Ray worker), by key, and the
    count of tasks it ran. Only the latest function is kept: a worker serves one stage at a time."""

    def __init__(self):
        self.key: str | None = None
        self.function: Callable | None = None
        self.tasks = 0

    def install(self, key: str, function: Callable) -> None:
        os.environ.update(_WORKER_ENV)
        self.key, self.function = key, function

    def run(self, item: Any) -> Any:
        """``function(item)``, giving freed memory back every ``TRIM_EVERY`` tasks."""
        self.tasks += 1
        if self.tasks % TRIM_EVERY == 0:
            release_freed_memory()
        return self.function(item)
