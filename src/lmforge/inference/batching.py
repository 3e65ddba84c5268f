"""Continuous batching: one thread samples every running request together, one token per step.

The engine knows token ids, sampling settings and stop strings; it knows nothing of HTTP (that is
``lmforge.serving``). Each request is a ``Job`` of ``n`` samples of one prompt; each sample owns a
slot of the model's ``KVSlots`` (its own keys, values and length). A step is:

1. admit waiting jobs while slots are free: prefill the prompt window less its last token into
   one slot (copied to the job's other slots), so the last prompt token is the slot's next input;
   a job that waited longer than ``queue_timeout`` ends with an error (status 503) instead;
2. one forward pass over every active slot, each feeding its next input at its own position
   (``lmforge.inference.decode``: the model's own computation at a fraction of its per-call cost);
3. per job, sample its slots' tokens with its own settings and generator (the rows of plain greedy
   jobs share one argmax, those of plain sampling jobs of one setting one distribution, each job
   drawing from its rows with its own generator; log-probabilities only when a job wants them), turn
   them into text
   (stop strings, end-of-text) and hand the pieces to the job's ``emit`` callback;
4. a job whose samples have all ended, or that was cancelled (the client left), frees its slots
   at once; the last active slot moves into each freed one, so the active slots stay first.

A new request therefore joins at the next step, and one request's stop never delays another's.
The tokens are those of ``generation.stream_samples`` for the same prompt, settings and seed
(the same window rule, the same draws from the job's generator over its ``n`` rows), up to
floating-point differences between a batched and a single forward pass.

Supervision. What fails while serving one job (its prefill, its draw, its text, its callback)
ends that job with an ``error`` event and frees its slots; the others go on. A failure of the
batched forward pass, which no one job owns, ends every running job and the engine goes on. If
the thread dies all the same, ``alive()`` says so and ``revive()`` ends what it held (status 503)
and starts a new thread, counted in ``restarts``.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.inference.decode import Decoder, prepare_weights
from lmforge.inference.generation import TextTail
from lmforge.inference.kv_slots import KVSlots
from lmforge.inference.sampling import SamplingConfig, probabilities, sample_next
from lmforge.inference.scoring import token_logprobs


@dataclass
class Event:
    """What one step produced for one sample of a job (``kind="token"``), or the job's end."""

    kind: str  # "token", "prompt" (the prompt's own logprobs), "done" or "error" (the message in ``text``)
    sample: int = 0
    text: str = ""  # text that became final with this token ('' when held back)
    token_id: int = -1
    logprob: float = 0.0  # log-probability of the chosen token under the model's distribution
    top: list[tuple[int, float]] | None = None  # the job's ``top_logprobs`` most likely tokens, (id, logprob)
    finish_reason: str | None = None  # set on the token that ended the sample: "stop" or "length"
    status: int = 500  # of an error: the HTTP status it calls for
    prompt: list[tuple] | None = None  # of a "prompt" event: scoring.token_logprobs of the prompt


class EngineBusy(Exception):
    """The queue of waiting jobs is full: try again later."""


@dataclass(eq=False)  # compared and hashed by identity: jobs are kept in sets and as dict keys
class Job:
    """One request: ``n`` samples of ``prompt_ids``. ``emit`` is called from the engine thread."""

    prompt_ids: list[int]
    cfg: SamplingConfig
    emit: Callable[[Event], None]
    n: int = 1
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # sample past the end-of-text token (benchmarks want fixed lengths)
    top_logprobs: int = 0  # how many alternatives each token event carries
    echo: bool = False  # first emit the prompt's own logprobs (a "prompt" event)
    generate: bool = True  # False: only the prompt's logprobs (echo with max_tokens 0); no slot is taken
    logprobs: bool = True  # each token event carries its log-probability (False: 0.0, and a step saves the work)
    cancelled: bool = False  # set by the caller when nobody waits for the answer any more
    queued_at: float = field(default_factory=time.monotonic)
    stop_ids: tuple = ()  # ids that end a sample besides end-of-text (a chat template's end of turn)

    def cancel(self) -> None:
        """Stop sampling this job: its slots are freed at the engine's next step."""
        self.cancelled = True


def _plain(cfg: SamplingConfig) -> bool:
    """Whether ``cfg`` reads the raw logits (nothing added or penalised): its rows can share work with others'."""
    return not cfg.logit_bias and cfg.repetition_penalty == 1.0 and not cfg.presence_penalty \
        and not cfg.frequency_penalty


class _Sample:
    """One sample of a job in one slot: every token so far, its window and its text."""

    def __init__(self, job: Job, index: int, tokens: list[int], start: int, tail: TextTail):
        self.job, self.index, self.tokens, self.start, self.tail = job, index, tokens, start, tail
        self.prompt_len = len(tokens)
        self.generated = 0
        self.finished = False


class Engine:
    """Runs jobs on ``loaded`` (a ModelDir) in a background thread, up to ``max_batch`` samples at once.

    max_queue: at most this many jobs wait for slots (``submit`` raises EngineBusy past it; None:
    no bound). queue_timeout: a job that waited this many seconds ends with an error of status 503.
    """

    def __init__(self, loaded, max_batch: int = 32, max_queue: int | None = None,
                 queue_timeout: float | None = None):
        self.loaded = loaded
        self.model = prepare_weights(loaded.model.eval())
        self.decoder = Decoder(self.model)
        self.max_batch, self.max_queue, self.queue_timeout = max_batch, max_queue, queue_timeout
        self.block_size = self.model.config.block_size
        self.device = next(self.model.parameters()).device
        self.slots = KVSlots.for_model(self.model, max_batch)
        self.active: list[_Sample] = []  # active[i] lives in slot i
        self.waiting: deque[Job] = deque()
        self.generators: dict[Job, torch.Generator | None] = {}
        self.wake = threading.Condition()
        self.steps = 0  # forward passes so far (tests read it to see that requests shared them)
        self.failed_jobs = 0  # jobs ended by an error while being served
        self.restarts = 0  # threads started again after one died
        self.running = True
        self._start_thread()

    def _start_thread(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="lmforge-engine", daemon=True)
        self.thread.start()

    def submit(self, *jobs: Job) -> None:
        """Queue ``jobs`` (all or none); each joins the running batch at the next step with free slots."""
        for job in jobs:
            if not 1 <= job.n <= self.max_batch:
                raise ValueError(f"n={job.n} must be between 1 and the engine's max_batch={self.max_batch}.")
            job.cfg.validate()
        with self.wake:
            if self.max_queue is not None and len(self.waiting) + len(jobs) > self.max_queue:
                raise EngineBusy(f"{len(self.waiting)} requests are waiting already (at most {self.max_queue})")
            self.waiting.extend(jobs)
            self.wake.notify()

    def close(self) -> None:
        """Stop the engine thread (jobs still running get no more events)."""
        with self.wake:
            self.running = False
            self.wake.notify()
        self.thread.join(timeout=10)

    def busy_slots(self) -> int:
        """Slots in use now."""
        return len(self.active)

    def queued(self) -> int:
        """Jobs waiting for slots now."""
        return len(self.waiting)

    def alive(self) -> bool:
        """Whether the engine thread runs (it should, until ``close``)."""
        return self.thread.is_alive()

    def revive(self) -> bool:
        """If the engine thread died: end every job it held (status 503), start a new thread; True when it did."""
        with self.wake:
            if not self.running or self.thread.is_alive():
                return False
            jobs = list(dict.fromkeys([s.job for s in self.active] + list(self.waiting)))
            self.active.clear()
            self.waiting.clear()
            self.generators.clear()
            self.slots.lengths.zero_()
            self.restarts += 1
            self._start_thread()
        for job in jobs:
            self._tell(job, Event("error", text="the engine failed while serving this request and was restarted; "
                                  "send it again", status=503))
        return True

    # --- the loop ---------------------------------------------------------------------------

    @torch.inference_mode()  # for the thread's whole life: entering it per step costs as much as an operation
    def _loop(self) -> None:
        while True:
            with self.wake:
                while self.running and not self.active and not self.waiting:
                    self.wake.wait()
                if not self.running:
                    return
            try:
                self._step()
            except Exception as err:  # the batched forward pass: no one job to blame, so every running job ends
                for job in list(dict.fromkeys(s.job for s in self.active)):
                    self._fail(job, err)

    def _step(self) -> None:
        self._free([s for s in self.active if s.job.cancelled])
        self._admit()
        if not self.active:
            return
        inputs = torch.tensor([s.tokens[-1] for s in self.active], device=self.device)
        logits = self.decoder(self.slots, inputs).float()
        self.steps += 1
        rows_of: dict[Job, list[int]] = {}
        for row, sample in enumerate(self.active):
            rows_of.setdefault(sample.job, []).append(row)
        # Each job's rows in sample order: its draws are then those of one batch of its samples.
        groups = {job: sorted(rows, key=lambda r: self.active[r].index) if len(rows) > 1 else rows
                  for job, rows in rows_of.items()}
        token_ids = [0] * len(self.active)
        failed: dict[Job, Exception] = {}
        argmax_rows = []  # of plain greedy jobs (no bias, no penalty): one argmax for all of them
        alike: dict[tuple, list[Job]] = {}  # plain sampling jobs by their settings: one distribution each
        for job, rows in groups.items():
            if _plain(job.cfg):
                if job.cfg.greedy:
                    argmax_rows += rows
                else:
                    alike.setdefault((job.cfg.temperature, job.cfg.top_k, job.cfg.top_p), []).append(job)
                continue
            try:
                for row, token_id in zip(rows, self._draw(rows, logits)):
                    token_ids[row] = token_id
            except Exception as err:
                failed[job] = err
        for jobs in alike.values():
            self._draw_alike(jobs, groups, logits, token_ids, failed)
        if len(argmax_rows) == len(token_ids):
            token_ids = logits.argmax(dim=-1).tolist()
        elif argmax_rows:
            for row, token_id in zip(argmax_rows, logits[argmax_rows].argmax(dim=-1).tolist()):
                token_ids[row] = token_id
        logprobs, chosen = None, [0.0] * len(token_ids)
        if any(job.logprobs or job.top_logprobs for job in groups):  # one log-softmax for the whole batch
            logprobs = F.log_softmax(logits, dim=-1)
            chosen = logprobs.gather(-1, torch.tensor(token_ids, device=self.device)[:, None])[:, 0].tolist()
        ended = []
        for job, rows in groups.items():
            if job in failed:
                continue
            try:
                ended += self._advance(rows, token_ids, chosen, logprobs)
            except Exception as err:
                failed[job] = err
        for job, err in failed.items():
            self._fail(job, err)
        self._free([s for s in ended if s.job not in failed])
        self._restart_full_windows()

    def _restart_full_windows(self) -> None:
        failed: dict[Job, Exception] = {}
        for row, sample in enumerate(self.active):
            if len(sample.tokens) - sample.start > self.block_size:  # the window is full: restart it
                sample.start = len(sample.tokens) - max(1, self.block_size // 2)
                try:
                    self._prefill(row, sample.tokens[sample.start : -1])
                except Exception as err:
                    failed[sample.job] = err
        for job, err in failed.items():
            self._fail(job, err)

    def _admit(self) -> None:
        starting, expired, taken = [], [], len(self.active)
        with self.wake:  # only the queue is read under the lock: submit never waits for a prefill
            while self.waiting:
                job = self.waiting[0]
                if not job.cancelled and job.generate and taken + job.n > self.max_batch:
                    break  # first come, first served: the job waits for free slots
                self.waiting.popleft()
                if not job.cancelled:
                    starting.append(job)
                    taken += job.n if job.generate else 0
            if self.queue_timeout is not None and self.waiting:
                now = time.monotonic()
                expired = [j for j in self.waiting if now - j.queued_at > self.queue_timeout]
                for job in expired:
                    self.waiting.remove(job)
        for job in starting:
            try:
                self._start(job)
            except Exception as err:
                self._fail(job, err)
        for job in expired:
            self._tell(job, Event("error", text=f"the request waited more than {self.queue_timeout:g} s for a "
                                  "free slot; the server is busy, send it again later", status=503))

    def _start(self, job: Job) -> None:
        if job.echo:
            job.emit(Event("prompt", prompt=token_logprobs(self.model, job.prompt_ids, self.block_size,
                                                           job.top_logprobs)))
        if not job.generate:
            job.emit(Event("done"))
            return
        first = len(self.active)
        tokens = list(job.prompt_ids)
        start = max(0, len(tokens) - self.block_size)
        for i in range(job.n):
            ends = [-1] if job.ignore_eos else [self.loaded.eot_id, *job.stop_ids]
            tail = TextTail(self.loaded.tokenizer, ends, job.stop)
            self.active.append(_Sample(job, i, list(tokens), start, tail))
        self._prefill(first, tokens[start:-1])
        for i in range(1, job.n):
            self.slots.move(first, first + i)
        generator = None
        if job.cfg.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(job.cfg.seed)
        self.generators[job] = generator

    def _prefill(self, row: int, window: list[int]) -> None:
        # Fill slot ``row`` with ``window``; its next input (the newest token) goes in the batched step.
        if window:
            self.model(torch.tensor([window], device=self.device), cache=self.slots.slot(row))
        self.slots.lengths[row] = len(window)

    def _draw(self, rows: list[int], logits: Tensor, probs: Tensor | None = None) -> list[int]:
        """The next token of each of one job's rows (in sample order), with the job's settings and generator
        (``probs``: the rows' distribution, worked out already for several jobs of one setting)."""
        samples = [self.active[r] for r in rows]
        job = samples[0].job
        if probs is not None:
            return torch.multinomial(probs, 1, generator=self.generators[job])[:, 0].tolist()
        contiguous = rows[-1] - rows[0] == len(rows) - 1 and rows == sorted(rows)
        job_logits = logits[rows[0] : rows[-1] + 1] if contiguous else logits[rows]
        previous = generated = None
        if job.cfg.repetition_penalty != 1.0:
            previous = torch.tensor([s.tokens for s in samples], device=self.device)
        if job.cfg.presence_penalty or job.cfg.frequency_penalty:
            generated = torch.tensor([s.tokens[s.prompt_len :] for s in samples], device=self.device)
        return sample_next(job_logits, job.cfg, self.generators[job], previous, generated)[:, 0].tolist()

    def _draw_alike(self, jobs: list[Job], groups: dict[Job, list[int]], logits: Tensor, token_ids: list[int],
                    failed: dict[Job, Exception]) -> None:
        """Draw for ``jobs`` of one plain sampling setting: one distribution for all their rows, then each
        job's draw from its own rows with its own generator (what ``sample_next`` gives each alone:
        the distribution is computed row by row)."""
        rows = [row for job in jobs for row in groups[job]]
        try:
            probs = probabilities(logits[rows], jobs[0].cfg)
        except Exception as err:
            failed.update(dict.fromkeys(jobs, err))
            return
        at = 0
        for job in jobs:
            mine = groups[job]
            try:
                for row, token_id in zip(mine, self._draw(mine, logits, probs[at : at + len(mine)])):
                    token_ids[row] = token_id
            except Exception as err:
                failed[job] = err
            at += len(mine)

    def _advance(self, rows: list[int], token_ids: list[int], chosen: list[float], logprobs: Tensor) -> list[_Sample]:
        """Append each row's token, emit its text; return the job's samples when they have all ended."""
        samples = [self.active[r] for r in rows]
        job = samples[0].job
        tops: list = [None] * len(rows)
        if job.top_logprobs:
            values, ids = logprobs[rows].topk(min(job.top_logprobs, logprobs.size(-1)), dim=-1)
            tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
        for row, sample, top in zip(rows, samples, tops):
            sample.tokens.append(token_ids[row])
            if sample.finished:  # sampled only to keep the job's draws those of one batch
                continue
            sample.generated += 1
            text = sample.tail.push(token_ids[row])
            reason = None
            if sample.tail.done:
                reason = "stop"
            elif sample.generated >= job.cfg.max_new_tokens:
                reason = "length"
                text += sample.tail.finish()
            sample.finished = reason is not None
            job.emit(Event("token", sample.index, text, token_ids[row], chosen[row], top, reason))
        if all(s.finished for s in samples):
            job.emit(Event("done"))
            return samples
        return []

    def _fail(self, job: Job, err: Exception) -> None:
        """End ``job`` with an error event and free its slots; the other jobs go on."""
        self.failed_jobs += 1
        self._free([s for s in self.active if s.job is job])
        self._tell(job, Event("error", text=f"{type(err).__name__}: {err}", status=500))

    @staticmethod
    def _tell(job: Job, event: Event) -> None:
        job.cancel()
        try:
            job.emit(event)
        except Exception:  # nobody can be told (the server's loop is gone): the job is ended all the same
            pass

    def _free(self, samples: list[_Sample]) -> None:
        gone = {id(s) for s in samples}
        for row in reversed(range(len(self.active))):
            if id(self.active[row]) not in gone:
                continue
            last = len(self.active) - 1
            if row != last:
                self.slots.move(last, row)
                self.active[row] = self.active[last]
            self.active.pop()
        for sample in samples:
            self.generators.pop(sample.job, None)
