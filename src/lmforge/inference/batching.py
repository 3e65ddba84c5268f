"""Continuous batching: one thread samples every running request together, one token per step.

The engine knows token ids, sampling settings and stop strings; it knows nothing of HTTP (that is
``lmforge.serving.server``). Each request is a ``Job`` of ``n`` samples of one prompt; each sample
owns a slot of the model's ``KVSlots`` (its own keys, values and length). A step is:

1. admit waiting jobs while slots are free: prefill the prompt window less its last token into
   one slot (copied to the job's other slots), so the last prompt token is the slot's next input;
2. one forward pass over every active slot, each feeding its next input at its own position;
3. per job, sample its slots' tokens with its own settings and generator, turn them into text
   (stop strings, end-of-text) and hand the pieces to the job's ``emit`` callback;
4. a job whose samples have all ended, or that was cancelled (the client left), frees its slots
   at once; the last active slot moves into each freed one, so the active slots stay first.

A new request therefore joins at the next step, and one request's stop never delays another's.
The tokens are those of ``generation.stream_samples`` for the same prompt, settings and seed
(the same window rule, the same draws from the job's generator over its ``n`` rows), up to
floating-point differences between a batched and a single forward pass.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.inference.generation import SamplingConfig, TextTail, sample_next
from lmforge.inference.kv_slots import KVSlots


@dataclass
class Event:
    """What one step produced for one sample of a job (``kind="token"``), or the job's end."""

    kind: str  # "token", "done" (every sample ended) or "error" (the message is in ``text``)
    sample: int = 0
    text: str = ""  # text that became final with this token ('' when held back)
    token_id: int = -1
    logprob: float = 0.0  # log-probability of the chosen token under the model's distribution
    finish_reason: str | None = None  # set on the token that ended the sample: "stop" or "length"


@dataclass
class Job:
    """One request: ``n`` samples of ``prompt_ids``. ``emit`` is called from the engine thread."""

    prompt_ids: list[int]
    cfg: SamplingConfig
    emit: Callable[[Event], None]
    n: int = 1
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # sample past the end-of-text token (benchmarks want fixed lengths)
    cancelled: bool = False  # set by the caller when nobody waits for the answer any more

    def cancel(self) -> None:
        """Stop sampling this job: its slots are freed at the engine's next step."""
        self.cancelled = True


class _Sample:
    """One sample of a job in one slot: every token so far, its window and its text."""

    def __init__(self, job: Job, index: int, tokens: list[int], start: int, tail: TextTail):
        self.job, self.index, self.tokens, self.start, self.tail = job, index, tokens, start, tail
        self.generated = 0
        self.finished = False


class Engine:
    """Runs jobs on ``loaded`` (a ModelDir) in a background thread, up to ``max_batch`` samples at once."""

    def __init__(self, loaded, max_batch: int = 32):
        self.loaded = loaded
        self.model = loaded.model.eval()
        self.max_batch = max_batch
        self.block_size = self.model.config.block_size
        self.device = next(self.model.parameters()).device
        self.slots = KVSlots.for_model(self.model, max_batch)
        self.active: list[_Sample] = []  # active[i] lives in slot i
        self.waiting: deque[Job] = deque()
        self.generators: dict[int, torch.Generator | None] = {}
        self.wake = threading.Condition()
        self.steps = 0  # forward passes so far (tests read it to see that requests shared them)
        self.running = True
        self.thread = threading.Thread(target=self._loop, name="lmforge-engine", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        """Queue ``job``; it joins the running batch at the next step with free slots."""
        if not 1 <= job.n <= self.max_batch:
            raise ValueError(f"n={job.n} must be between 1 and the engine's max_batch={self.max_batch}.")
        job.cfg.validate()
        with self.wake:
            self.waiting.append(job)
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

    # --- the loop ---------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self.wake:
                while self.running and not self.active and not self.waiting:
                    self.wake.wait()
                if not self.running:
                    return
            try:
                self._step()
            except Exception as err:  # a bug, not bad input: end every job with it, keep serving
                for job in {s.job for s in self.active} | set(self.waiting):
                    job.emit(Event("error", text=f"{type(err).__name__}: {err}"))
                self.active.clear()
                self.waiting.clear()
                self.generators.clear()

    @torch.inference_mode()
    def _step(self) -> None:
        self._free([s for s in self.active if s.job.cancelled])
        self._admit()
        if not self.active:
            return
        inputs = torch.tensor([[s.tokens[-1]] for s in self.active], device=self.device)
        logits = self.model(inputs, cache=self.slots)[0][:, -1].float()
        self.steps += 1
        rows_of: dict[int, list[int]] = {}
        for row, sample in enumerate(self.active):
            rows_of.setdefault(id(sample.job), []).append(row)
        # Each job's rows in sample order: its draws are then those of one batch of its samples.
        groups = [sorted(rows, key=lambda r: self.active[r].index) for rows in rows_of.values()]
        token_ids = [0] * len(self.active)
        for rows in groups:
            for row, token_id in zip(rows, self._draw(rows, logits)):
                token_ids[row] = token_id
        # One log-softmax for the whole batch rather than one per job.
        chosen = torch.tensor(token_ids, device=self.device)[:, None]
        logprobs = F.log_softmax(logits, dim=-1).gather(-1, chosen)[:, 0].tolist()
        ended = []
        for rows in groups:
            ended += self._advance(rows, token_ids, logprobs)
        self._free(ended)
        for row, sample in enumerate(self.active):
            if len(sample.tokens) - sample.start > self.block_size:  # the window is full: restart it
                sample.start = len(sample.tokens) - max(1, self.block_size // 2)
                self._prefill(row, sample.tokens[sample.start : -1])

    def _admit(self) -> None:
        with self.wake:
            while self.waiting:
                job = self.waiting[0]
                if not job.cancelled and len(self.active) + job.n > self.max_batch:
                    return  # first come, first served: the job waits for free slots
                self.waiting.popleft()
                if not job.cancelled:
                    self._start(job)

    def _start(self, job: Job) -> None:
        first = len(self.active)
        tokens = list(job.prompt_ids)
        start = max(0, len(tokens) - self.block_size)
        for i in range(job.n):
            tail = TextTail(self.loaded.tokenizer, -1 if job.ignore_eos else self.loaded.eot_id, job.stop)
            self.active.append(_Sample(job, i, list(tokens), start, tail))
        self._prefill(first, tokens[start:-1])
        for i in range(1, job.n):
            self.slots.move(first, first + i)
        generator = None
        if job.cfg.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(job.cfg.seed)
        self.generators[id(job)] = generator

    def _prefill(self, row: int, window: list[int]) -> None:
        # Fill slot ``row`` with ``window``; its next input (the newest token) goes in the batched step.
        if window:
            self.model(torch.tensor([window], device=self.device), cache=self.slots.slot(row))
        self.slots.lengths[row] = len(window)

    def _draw(self, rows: list[int], logits: Tensor) -> list[int]:
        """The next token of each of one job's rows (in sample order), with the job's settings and generator."""
        samples = [self.active[r] for r in rows]
        job = samples[0].job
        contiguous = rows[-1] - rows[0] == len(rows) - 1 and rows == sorted(rows)
        job_logits = logits[rows[0] : rows[-1] + 1] if contiguous else logits[rows]
        previous = None
        if job.cfg.repetition_penalty != 1.0:
            previous = torch.tensor([s.tokens for s in samples], device=self.device)
        return sample_next(job_logits, job.cfg, self.generators[id(job)], previous)[:, 0].tolist()

    def _advance(self, rows: list[int], token_ids: list[int], logprobs: list[float]) -> list[_Sample]:
        """Append each row's token, emit its text; return the job's samples when they have all ended."""
        samples = [self.active[r] for r in rows]
        job = samples[0].job
        for row, sample in zip(rows, samples):
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
            job.emit(Event("token", sample.index, text, token_ids[row], logprobs[row], reason))
        if all(s.finished for s in samples):
            job.emit(Event("done"))
            return samples
        return []

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
            self.generators.pop(id(sample.job), None)
