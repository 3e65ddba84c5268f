"""The engines run the functions they are handed: results in input order, input read only a bounded
distance ahead, a function sent to each worker process once, and no knowledge of what it does."""

from __future__ import annotations

import ast
import os
from collections import Counter

import pytest

from lmforge.engines.choice import open_engine
from lmforge.engines.local import InProcess, ProcessPool
from lmforge.engines.workers import default_workers, in_order, look_ahead
from lmforge.errors import LmforgeError
from tests.helpers import ROOT

ENGINES = ROOT / "src/lmforge/engines"


class Pulled:
    """Items 0, 1, 2, ... counting how many were taken from it."""

    def __init__(self, n: int):
        self.n, self.taken = n, 0

    def __iter__(self):
        for i in range(self.n):
            self.taken += 1
            yield i


def test_in_order_reads_the_input_only_as_far_ahead_as_allowed():
    items = Pulled(100)
    results = in_order(lambda item: ("task", item), lambda handle: handle[1] * 10, items, ahead=6)
    assert next(results) == 0
    assert items.taken == 6  # not the whole input, as Pool.imap would take
    assert list(results) == [10 * i for i in range(1, 100)]


def test_in_order_cancels_what_is_pending_on_an_early_stop():
    cancelled = []
    results = in_order(lambda item: item, lambda handle: handle, range(100), ahead=4, cancel=cancelled.append)
    assert [next(results), next(results)] == [0, 1]
    results.close()
    assert cancelled == [2, 3, 4]  # submitted, never collected


class CountCalls:
    """A picklable function that counts its calls on itself: each worker's count runs 1, 2, 3, ...
    only if the worker kept the one copy it was sent."""

    def __init__(self):
        self.calls = 0

    def __call__(self, item: int) -> tuple[int, int, int]:
        self.calls += 1
        return item, os.getpid(), self.calls


def test_a_process_pool_sends_the_function_to_each_worker_once_and_keeps_the_order():
    with ProcessPool(CountCalls(), workers=2) as pool:
        results = list(pool.map(range(60)))
    assert [item for item, _, _ in results] == list(range(60))
    per_worker = Counter(pid for _, pid, _ in results)
    assert os.getpid() not in per_worker
    for pid, count in per_worker.items():
        assert sorted(calls for _, p, calls in results if p == pid) == list(range(1, count + 1))


def test_open_engine_picks_the_engine_that_data_engine_and_workers_ask_for():
    with open_engine({"engine": "local", "workers": 1}, CountCalls(), "test") as engine:
        assert isinstance(engine, InProcess) and engine.in_process
        assert [calls for _, _, calls in engine.map(range(5))] == [1, 2, 3, 4, 5]
    with open_engine({"engine": "local", "workers": 2}, CountCalls(), "test", pool=False) as engine:
        assert isinstance(engine, InProcess)  # the stage said the work is too small for a pool
    with open_engine({"engine": None, "workers": 2}, CountCalls(), "test") as engine:
        assert isinstance(engine, ProcessPool) and engine.workers == 2 and not engine.in_process
    with pytest.raises(LmforgeError, match=r"^data.engine='spark' is not one of local, ray.$"):
        open_engine({"engine": "spark"}, CountCalls(), "test")
    assert default_workers() >= 1 and look_ahead(3) == 8


def test_the_engines_know_nothing_of_the_stages_and_count_cores_in_one_place():
    for path in sorted(ENGINES.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lmforge"):
                assert node.module.startswith("lmforge.engines") or node.module == "lmforge.errors", \
                    f"{path.name} imports {node.module}"
    counting = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "src/lmforge").rglob("*.py"))
                if "sched_getaffinity" in p.read_text() or "def default_workers" in p.read_text()]
    assert counting == ["src/lmforge/engines/workers.py"]
