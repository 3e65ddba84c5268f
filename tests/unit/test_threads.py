"""``trainer.num_threads``: the counts ``auto`` tries, the choice among their timings, the probe's
turns (on a fake clock), the answer remembered per machine and model, and the rule of the key."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.config.rules import problem
from lmforge.training.threads import (
    candidates,
    fewest_within,
    measured_choice,
    resolve_threads,
    time_counts,
    wait_policy,
)

MODEL = {"vocab_size": 86, "block_size": 64, "n_layer": 4, "n_head": 4, "n_embd": 128}


def never(counts):
    raise AssertionError("the probe ran, though the answer was remembered")


def test_auto_tries_powers_of_two_then_every_core():
    assert candidates(1) == [1]
    assert candidates(2) == [1, 2]
    assert candidates(6) == [1, 2, 4, 6]
    assert candidates(8) == [1, 2, 4, 8]
    assert candidates(0) == [1]  # os.cpu_count() may say nothing


@pytest.mark.parametrize("seconds, chosen", [
    ({1: 1.0, 2: 0.5}, 2),             # twice as fast: two threads
    ({1: 1.0, 2: 0.95}, 1),            # within 10%: the fewer
    ({1: 0.08, 2: 1.0}, 1),            # two threads spinning beside a busy core
    ({1: 1.0, 2: 0.5, 4: 0.52}, 2),    # four no faster than two
    ({1: 1.0, 2: 0.6, 4: 0.3}, 4),
    ({4: 0.3}, 4),
])
def test_auto_keeps_the_fewest_threads_within_ten_percent_of_the_fastest(seconds, chosen):
    assert fewest_within(seconds) == chosen


class FakeMachine:
    """A clock and a step whose time depends on torch's thread count (and on the round: load)."""

    def __init__(self, per_thread: dict[int, list[float]]):
        self.now, self.per_thread, self.calls = 0.0, per_thread, []

    def clock(self) -> float:
        return self.now

    def step(self) -> None:
        n = torch.get_num_threads()
        self.calls.append(n)
        times = self.per_thread[n]
        self.now += times[min(len([c for c in self.calls if c == n]) - 1, len(times) - 1)]


def test_the_counts_take_turns_and_each_keeps_its_best_step():
    before = torch.get_num_threads()
    # warm-up, then three rounds; two threads meet a busy moment in round 2 only
    machine = FakeMachine({1: [9.0, 0.10, 0.11, 0.10], 2: [9.0, 0.06, 0.50, 0.07]})
    best = time_counts(machine.step, [1, 2], rounds=3, clock=machine.clock, budget=1e9)
    assert best == pytest.approx({1: 0.10, 2: 0.06})
    assert machine.calls == [1, 2, 1, 2, 1, 2, 1, 2]  # warm-ups, then turns, never one count in a row
    assert torch.get_num_threads() == before


def test_a_slow_model_stops_the_rounds_at_the_budget_but_times_every_count_once():
    machine = FakeMachine({1: [5.0], 2: [4.0]})
    best = time_counts(machine.step, [1, 2], rounds=5, clock=machine.clock, budget=10.0)
    assert best == {1: 5.0, 2: 4.0}
    assert len(machine.calls) == 4  # warm-ups and one round


def test_auto_measures_once_per_machine_and_model_then_remembers(tmp_path):
    cache = tmp_path / "threads.json"
    first = measured_choice(MODEL, 12, "32", measure=lambda counts: {1: 0.08, 2: 0.05}, cores=2, cache=cache)
    assert first.threads == 2 and "measured now" in first.reason and "2 -> 50 ms" in first.reason
    # a later run on a busy moment would measure otherwise: it takes the remembered answer
    again = measured_choice(MODEL, 12, "32", measure=never, cores=2, cache=cache)
    assert again.threads == 2 and "remembered in" in again.reason and again.seconds == first.seconds
    # another model, batch, precision or core count is another question
    wider = measured_choice({**MODEL, "n_embd": 256}, 12, "32", measure=lambda c: {1: 0.1, 2: 0.2}, cores=2,
                            cache=cache)
    assert wider.threads == 1
    assert measured_choice(MODEL, 24, "32", measure=lambda c: {1: 0.1, 2: 0.2}, cores=2, cache=cache).threads == 1
    assert measured_choice(MODEL, 12, "32", measure=lambda c: {1: 1, 2: .6, 4: .3}, cores=4, cache=cache).threads == 4
    assert len(json.loads(cache.read_text())) == 4
    assert measured_choice(MODEL, 12, "32", measure=never, cores=2, cache=cache).threads == 2


@pytest.mark.parametrize("content", ["", "{not json", "[1, 2]", '{"x": 1}', "\x00\xff"])
def test_an_unreadable_or_foreign_cache_is_measured_again_and_rewritten(tmp_path, content):
    cache = tmp_path / "threads.json"
    cache.write_text(content, encoding="latin-1")
    assert measured_choice(MODEL, 12, "32", measure=lambda c: {1: 0.1, 2: 0.04}, cores=2, cache=cache).threads == 2
    assert measured_choice(MODEL, 12, "32", measure=never, cores=2, cache=cache).threads == 2


def test_a_remembered_answer_that_is_not_a_count_is_measured_again(tmp_path):
    cache = tmp_path / "threads.json"
    measured_choice(MODEL, 12, "32", measure=lambda c: {1: 0.1, 2: 0.04}, cores=2, cache=cache)
    entries = json.loads(cache.read_text())
    for bad in (0, -3, "2", None, 2.5, True):
        cache.write_text(json.dumps({key: {**value, "threads": bad} for key, value in entries.items()}))
        got = measured_choice(MODEL, 12, "32", measure=lambda c: {1: 0.1, 2: 0.3}, cores=2, cache=cache)
        assert got.threads == 1, bad


def test_an_unwritable_cache_still_answers(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    got = measured_choice(MODEL, 12, "32", measure=lambda c: {1: 0.1, 2: 0.04}, cores=2, cache=blocked / "threads.json")
    assert got.threads == 2


def test_one_core_needs_no_probe(tmp_path):
    assert measured_choice(MODEL, 12, "32", measure=never, cores=1, cache=tmp_path / "t.json").threads == 1


def test_a_number_is_kept_null_is_torchs_default_and_auto_off_the_cpu_measures_nothing(tmp_path):
    probe = {"measure": never, "cores": 2, "cache": tmp_path / "t.json"}
    assert resolve_threads(3, "cpu", MODEL, 12, "32", **probe).threads == 3
    assert resolve_threads(None, "cpu", MODEL, 12, "32", **probe).threads == torch.get_num_threads()
    assert resolve_threads("auto", "cuda", MODEL, 12, "bf16-mixed", **probe).threads == torch.get_num_threads()
    chosen = resolve_threads("auto", "cpu", MODEL, 12, "32", measure=lambda c: {1: 0.2, 2: 0.1}, cores=2,
                             cache=tmp_path / "t.json")
    assert chosen.threads == 2


@pytest.mark.parametrize("value", ["auto", 1, 2, 64, None])
def test_the_rule_takes_auto_a_count_or_null(value):
    assert problem("trainer.num_threads", value) is None


@pytest.mark.parametrize("value", [0, -1, "fast", "AUTO", 1.5, float("nan"), 2**70, True])
def test_the_rule_refuses_anything_else_in_one_sentence(value):
    found = problem("trainer.num_threads", value)
    assert found and found.startswith("trainer.num_threads=") and "auto" in found and found.count(".") >= 1


def test_the_wait_policy_is_what_torchs_runtime_read():
    import os

    import lmforge

    assert wait_policy() == lmforge.WAIT_POLICY
    assert wait_policy() in ("passive", "active", os.environ.get("OMP_WAIT_POLICY", "").lower())
