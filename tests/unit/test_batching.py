"""Tests for continuous batching: KVSlots decoding equals one sequence at a time, and the engine
gives the text of ``stream_samples`` while jobs join, end and are cancelled around each other."""

from __future__ import annotations

import queue

import numpy as np
import pytest
import torch

from lmforge.inference.batching import Engine, Job
from lmforge.inference.generation import SamplingConfig, encode_prompt, stream_samples
from lmforge.inference.kv_slots import KVSlots
from lmforge.model.directory import load_model_dir
from tests.helpers import LLAMA_STYLE, make_model_dir, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    "options", [dict(positions="learned"), dict(positions="sinusoidal"), LLAMA_STYLE], ids=str
)
def test_slot_decoding_equals_each_sequence_decoded_alone(options):
    model = tiny_model(**options)
    lengths = [3, 9, 1, 6]  # each slot at its own position
    sequences = [torch.randint(0, 32, (n + 4,), generator=torch.Generator().manual_seed(n)) for n in lengths]
    slots = KVSlots.for_model(model, 6)
    for row, (seq, n) in enumerate(zip(sequences, lengths)):
        model(seq[None, :n], cache=slots.slot(row))
        slots.lengths[row] = n
    for step in range(4):  # four batched decode steps, each slot one token further
        batched = model(torch.stack([seq[n + step] for seq, n in zip(sequences, lengths)])[:, None], cache=slots)[0]
        for row, (seq, n) in enumerate(zip(sequences, lengths)):
            alone = model(seq[None, : n + step + 1])[0][:, -1]
            torch.testing.assert_close(batched[row], alone, rtol=1e-9, atol=1e-9)
    assert slots.lengths[:4].tolist() == [n + 4 for n in lengths]


def test_moving_a_slot_keeps_its_sequence():
    model = tiny_model()
    seq = torch.arange(1, 8)[None]
    slots = KVSlots.for_model(model, 3)
    model(seq[:, :6], cache=slots.slot(2))
    slots.lengths[2] = 6
    slots.move(2, 0)
    logits = model(seq[:, 6:7], cache=slots)[0][0, -1]  # slot 0 only (B = 1)
    torch.testing.assert_close(logits, model(seq)[0][0, -1], rtol=1e-9, atol=1e-9)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    loaded = load_model_dir(make_model_dir(tmp_path_factory.mktemp("batching") / "model"))
    loaded.model.double()  # float64: a batched and a single forward pick the same tokens
    engine = Engine(loaded, max_batch=6)
    yield engine
    engine.close()


def submit(engine, prompt, cfg, n=1, stop=(), ignore_eos=False) -> queue.Queue:
    """Queue a job; returns the queue of its events (``.job`` is the job)."""
    events: queue.Queue = queue.Queue()
    events.job = Job(encode_prompt(engine.loaded, prompt)[0].tolist(), cfg, events.put, n, list(stop), ignore_eos)
    engine.submit(events.job)
    return events


def texts_of(events: queue.Queue, n: int) -> list[str]:
    texts = [""] * n
    while (event := events.get(timeout=60)).kind != "done":
        assert event.kind == "token", event.text
        texts[event.sample] += event.text
    return texts


def reference(engine, prompt, cfg, n=1, stop=()) -> list[str]:
    texts = [""] * n
    for sample, piece in stream_samples(engine.loaded, prompt, cfg, list(stop), n):
        texts[sample] += piece
    return texts


def test_jobs_running_together_give_the_text_of_each_alone(engine):
    # Block size 16 and 40 tokens: every sample restarts its window while others run beside it.
    jobs = [("the king", SamplingConfig(max_new_tokens=40, seed=1, top_k=10), 3, ()),
            ("good night, fair lord", SamplingConfig(max_new_tokens=25, seed=2, repetition_penalty=1.3), 1, ()),
            ("love", SamplingConfig(max_new_tokens=40, temperature=0), 1, ("e",)),
            ("death", SamplingConfig(max_new_tokens=30, seed=3, top_p=0.9), 2, ())]
    steps = engine.steps
    queues = [submit(engine, *job) for job in jobs]
    results = [texts_of(q, job[2]) for q, job in zip(queues, jobs)]
    assert results == [reference(engine, *job) for job in jobs]
    # 3 + 1 + 1 + 2 = 7 samples need more than the 6 slots: the last waits, the rest share passes.
    assert engine.steps - steps < 40 + 25 + 40 + 30
    assert engine.busy_slots() == 0


def test_jobs_of_one_setting_share_a_distribution_and_each_draws_its_own(engine):
    # Six samples of three jobs with the same temperature, top-k and top-p: one distribution a step.
    settings = dict(max_new_tokens=30, temperature=0.8, top_k=20, top_p=0.9)
    jobs = [("the king", SamplingConfig(seed=11, **settings), 2, ()),
            ("good night", SamplingConfig(seed=12, **settings), 1, ()),
            ("love", SamplingConfig(seed=13, **settings), 3, ())]
    queues = [submit(engine, *job) for job in jobs]
    results = [texts_of(q, job[2]) for q, job in zip(queues, jobs)]
    assert results == [reference(engine, *job) for job in jobs]


def test_a_job_without_logprobs_gets_the_same_tokens_and_no_logprob_work(engine):
    cfg = SamplingConfig(max_new_tokens=12, temperature=0)
    ids = encode_prompt(engine.loaded, "the king")[0].tolist()
    boxes = [queue.Queue(), queue.Queue()]
    # Each job's token events, then None at its end.
    emitters = [lambda e, box=box: box.put(e if e.kind == "token" else None) for box in boxes]
    # One after the other: a step computes the log-probabilities of all its rows once any job wants them.
    engine.submit(Job(ids, cfg, emitters[1], logprobs=False))
    without = list(iter(lambda: boxes[1].get(timeout=60), None))
    engine.submit(Job(ids, cfg, emitters[0]))
    with_logprobs = list(iter(lambda: boxes[0].get(timeout=60), None))
    assert [e.token_id for e in with_logprobs] == [e.token_id for e in without]
    assert all(e.logprob < 0 for e in with_logprobs) and all(e.logprob == 0.0 for e in without)


def test_a_cancelled_job_frees_its_slots_and_others_go_on(engine):
    endless = submit(engine, "the king", SamplingConfig(max_new_tokens=10_000, seed=4), n=5, ignore_eos=True)
    endless.get(timeout=60)
    jobs = [submit(engine, "love", SamplingConfig(max_new_tokens=12, seed=5))]
    # All 6 slots are busy until the 5-sample job is cancelled: then the 2-sample job gets in.
    jobs.append(submit(engine, "fair", SamplingConfig(max_new_tokens=12, seed=6), n=2))
    assert texts_of(jobs[0], 1) == reference(engine, "love", SamplingConfig(max_new_tokens=12, seed=5))
    assert jobs[1].empty()
    endless.job.cancel()
    assert texts_of(jobs[1], 2) == reference(engine, "fair", SamplingConfig(max_new_tokens=12, seed=6), 2)


# --- Supervision: one job's failure is that job's alone ------------------------------------------


@pytest.fixture
def fresh_engine(tmp_path):
    loaded = load_model_dir(make_model_dir(tmp_path / "model"))
    engines = []

    def make(**options):
        engines.append(Engine(loaded, **{"max_batch": 4, **options}))
        return engines[-1]

    yield make
    for engine in engines:
        engine.close()


def test_a_failing_job_gets_an_error_and_the_others_go_on(fresh_engine, monkeypatch):
    engine = fresh_engine()
    draw = engine._draw

    def faulty(rows, logits, *probs):  # the fault: any draw for the job whose prompt is "love"
        if engine.active[rows[0]].job.prompt_ids == encode_prompt(engine.loaded, "love")[0].tolist():
            raise RuntimeError("injected fault")
        return draw(rows, logits, *probs)

    monkeypatch.setattr(engine, "_draw", faulty)
    cfg = SamplingConfig(max_new_tokens=30, seed=1)
    good = submit(engine, "the king", cfg, n=2, ignore_eos=True)
    doomed = submit(engine, "love", cfg, ignore_eos=True)
    error = doomed.get(timeout=60)
    assert (error.kind, error.status) == ("error", 500) and "injected fault" in error.text
    assert len(texts_of(good, 2)) == 2  # ran to its end beside the failure
    after = submit(engine, "fair", cfg)
    assert texts_of(after, 1) == reference(engine, "fair", cfg)
    assert engine.alive() and engine.failed_jobs == 1 and engine.busy_slots() == 0


def test_jobs_are_hashed_by_identity():
    a = Job([1, 2], SamplingConfig(), print)
    b = Job([1, 2], SamplingConfig(), print)
    assert a != b and len({a, b}) == 2


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread dies on purpose
def test_a_dead_engine_thread_is_revived_and_what_it_held_gets_a_503(fresh_engine, monkeypatch):
    engine = fresh_engine()

    class Fatal(BaseException):  # what no `except Exception` catches: the thread dies
        pass

    def die():
        raise Fatal

    monkeypatch.setattr(engine, "_step", die)
    held = submit(engine, "the king", SamplingConfig(max_new_tokens=5, seed=1))
    engine.thread.join(timeout=60)
    assert not engine.alive()
    monkeypatch.undo()
    assert engine.revive() and engine.restarts == 1 and engine.alive()
    event = held.get(timeout=60)
    assert (event.kind, event.status) == ("error", 503)
    cfg = SamplingConfig(max_new_tokens=8, seed=2)
    assert texts_of(submit(engine, "love", cfg), 1) == reference(engine, "love", cfg)
    assert not engine.revive()  # alive: nothing to do


def test_a_full_queue_refuses_and_a_long_wait_ends_with_a_503(fresh_engine):
    from lmforge.inference.batching import EngineBusy

    engine = fresh_engine(max_batch=2, max_queue=1, queue_timeout=0.2)
    hog = submit(engine, "the king", SamplingConfig(max_new_tokens=10**6, seed=1), n=2, ignore_eos=True)
    hog.get(timeout=60)  # both slots busy
    waiting = submit(engine, "love", SamplingConfig(max_new_tokens=5))
    with pytest.raises(EngineBusy):
        submit(engine, "fair", SamplingConfig(max_new_tokens=5))
    event = waiting.get(timeout=60)
    assert (event.kind, event.status) == ("error", 503) and "waited more than 0.2 s" in event.text
    hog.job.cancel()
    cfg = SamplingConfig(max_new_tokens=5, seed=3)
    assert texts_of(submit(engine, "fair", cfg), 1) == reference(engine, "fair", cfg)


def test_echo_gives_the_prompt_logprobs_as_evaluate_scores_them(fresh_engine):
    from lmforge.evaluation.metrics import score_tokens

    engine = fresh_engine()
    ids = encode_prompt(engine.loaded, "the king and the queen speak of love and death")[0].tolist()
    assert len(ids) > engine.block_size + 1  # several windows
    events: queue.Queue = queue.Queue()
    engine.submit(Job(ids, SamplingConfig(), events.put, echo=True, generate=False, top_logprobs=3))
    prompt = events.get(timeout=60)
    assert prompt.kind == "prompt" and events.get(timeout=60).kind == "done"
    assert prompt.prompt[0] == (None, None) and len(prompt.prompt) == len(ids)
    nats = score_tokens(engine.model, np.array(ids), engine.block_size)["nats"]
    assert -sum(lp for lp, _ in prompt.prompt[1:]) == pytest.approx(nats, rel=1e-5)
    for lp, top in prompt.prompt[1:]:
        assert len(top) == 3 and top[0][1] >= lp - 1e-6 and top[0][1] >= top[1][1] >= top[2][1]
