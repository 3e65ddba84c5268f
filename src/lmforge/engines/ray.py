"""The Ray engine of the prepare and tokenize stages (``data.engine=ray``): where their work runs, not what it does.

Reading, cleaning, the short-document rule, hashing and encoding are the local engine's own
functions (``lmforge.corpus.documents.read_file``, ``lmforge.tokenization.encode.encode_chunk``), called inside Ray
tasks. This module only hands them out and takes the results back *in input order*, so the stage's
own process writes the same bytes as the local engine, however many workers run and in whatever
order tasks finish:

- prepare: one task per batch of source files reads, cleans and hashes their documents; the stage
  process then deduplicates (one hash set for the whole corpus, so exact dedup stays exact) and
  splits them, file by file in ``data.sources`` order.
- tokenize: one task per chunk of a prepared split (about a megabyte) encodes it; the stage
  process writes the ids to the shards in chunk order.

Ray retries a task whose worker died (``max_retries``), so a killed worker costs time, not bytes.
Memory: the stage process holds at most ``2 * workers + 2`` results in flight; a worker holds one
batch of files' cleaned documents (prepare; a batch is at most ``_BATCH_BYTES`` of files, or one
larger file whole) or one chunk and its ids (tokenize).

Ray itself is imported only here and only when ``data.engine=ray`` (it is the ``lmforge[ray]`` extra).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import numpy as np

from lmforge.errors import LmforgeError, missing_extra

ENGINES = ("local", "ray")
# Source files are handed out in batches of about this many bytes (a larger file goes alone).
_BATCH_BYTES = 8 << 20
# Seconds to wait for a cluster's address to answer, then for Ray to join it, before one sentence.
_CONNECT_SECONDS = 5
_JOIN_SECONDS = 15
# Object store of a local Ray started by the stage: results stream through it a few at a time.
_LOCAL_OBJECT_STORE_BYTES = 512 << 20
_RETRIES = 3


def engine_of(data_cfg) -> str:
    """``data.engine`` validated: ``local`` or ``ray``."""
    engine = str(data_cfg.get("engine") or "local")
    if engine not in ENGINES:
        raise LmforgeError(f"data.engine='{engine}' is not one of {', '.join(ENGINES)}.")
    return engine


class RayRun:
    """A connection to Ray for one stage: ``data.ray_address`` (null: start a local Ray and stop it at
    ``close``), sized by ``data.workers``. A Ray already initialised in this process is used as it is."""

    def __init__(self, data_cfg):
        try:
            import ray
        except ImportError:
            raise missing_extra("data.engine=ray", "ray", "or set data.engine=local") from None
        self.ray = ray
        self.started = False
        address = data_cfg.get("ray_address")
        if not ray.is_initialized():
            start = time.perf_counter()
            if address in (None, "", "local"):
                ray.init(num_cpus=int(data_cfg.get("workers") or _cores()),
                         object_store_memory=_LOCAL_OBJECT_STORE_BYTES, include_dashboard=False,
                         logging_level=logging.WARNING, log_to_driver=True)
            else:
                _connect(ray, str(address))
            self.started = True
        self.workers = int(data_cfg.get("workers") or ray.cluster_resources().get("CPU", 1))
        if self.started:
            where = "a local Ray" if address in (None, "", "local") else f"the Ray cluster at {address}"
            print(f"ray: {where} with {ray.cluster_resources().get('CPU', 0):g} CPUs ready in "
                  f"{time.perf_counter() - start:.1f} s; {self.workers} tasks at a time", file=sys.stderr, flush=True)

    def close(self) -> None:
        """Disconnect (and stop the local Ray) if this run started it."""
        if self.started:
            self.ray.shutdown()
            self.started = False

    def __enter__(self) -> RayRun:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def in_order(self, task, argument_lists: Iterable[tuple]) -> Iterator:
        """``task.remote(*arguments)`` for each tuple, results in input order, ``2 * workers + 2`` in flight."""
        ray = self.ray
        remote = task.options(max_retries=_RETRIES)
        pending: deque = deque()
        ahead = 2 * self.workers + 2
        try:
            for arguments in argument_lists:
                pending.append(remote.remote(*arguments))
                if len(pending) >= ahead:
                    yield self._get(pending.popleft())
            while pending:
                yield self._get(pending.popleft())
        finally:
            for ref in pending:  # an error or an early stop: no task keeps running for nothing
                ray.cancel(ref, force=True)

    def _get(self, ref):
        ray = self.ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as err:
            if isinstance(err.cause, LmforgeError):
                raise err.cause from None
            raise
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError) as err:
            raise LmforgeError(f"a Ray worker failed {_RETRIES + 1} times on the same task ({type(err).__name__}); "
                               "check the cluster's memory and logs (ray status) and rerun the stage.") from None


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _connect(ray, address: str) -> None:
    """``ray.init(address)``, or one sentence within ``_CONNECT_SECONDS + _JOIN_SECONDS`` (20 s) when no
    Ray cluster answers there."""
    fix = "start the cluster (ray start --head) or fix data.ray_address (null starts a local Ray)"
    if address != "auto":
        parts = urlsplit(address if "://" in address else f"gcs://{address}")
        try:
            host, port = parts.hostname, parts.port or (10001 if parts.scheme == "ray" else 6379)
        except ValueError:
            raise LmforgeError(f"data.ray_address='{address}' is not auto, host:port or ray://host:port; "
                               f"{fix}.") from None
        try:
            socket.create_connection((host, port), timeout=_CONNECT_SECONDS).close()
        except OSError as err:
            raise LmforgeError(f"data.ray_address='{address}': nothing answers at {host}:{port} ({err}); "
                               f"{fix}.") from None
    # Something may answer the port and never speak Ray (a proxy, another service): ray.init would then
    # wait for minutes, so it runs in a thread given _JOIN_SECONDS (the stage ends on the error anyway).
    outcome: list = []
    joining = threading.Thread(target=_init, args=(ray, address, outcome), daemon=True)
    joining.start()
    joining.join(_JOIN_SECONDS)
    if not outcome:
        raise LmforgeError(f"data.ray_address='{address}': something answers there but no Ray cluster joined within "
                           f"{_JOIN_SECONDS} s; {fix}.")
    err = outcome[0]
    if err is not None:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LmforgeError(f"data.ray_address='{address}': cannot join the Ray cluster ({first}); check that it is up "
                           "(ray status), runs this Ray version, and, if it uses token authentication, that "
                           "RAY_AUTH_MODE=token and its token (~/.ray/auth_token) are set here.") from None


def _init(ray, address: str, outcome: list) -> None:
    try:
        # ERROR: in a thread Ray warns that it cannot set its SIGTERM handler, which is harmless here.
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=True)
        outcome.append(None)
    except Exception as err:  # reported by _connect as one sentence
        outcome.append(err)


# --- prepare ---------------------------------------------------------------------------------


class _Recorder:
    """Stands in for the splits inside a task: keeps each cleaned document as (chars, bytes, digest)."""

    def __init__(self):
        self.kept: list[tuple[int, bytes, bytes]] = []
        self._pieces: list[tuple[int, bytes]] | None = None

    def add(self, chars: int, data: bytes, digest: bytes) -> None:
        self.kept.append((chars, data, digest))

    def begin(self) -> None:
        self._pieces = []

    def write(self, chars: int, data: bytes) -> None:
        self._pieces.append((chars, data))

    def commit(self, digest: bytes) -> None:
        self.kept.append((sum(c for c, _ in self._pieces), b"".join(d for _, d in self._pieces), digest))
        self._pieces = None

    def abort(self) -> None:
        self._pieces = None


def _read_files(batch: list, read_keys: dict, form: str | None, min_chars: int) -> list[tuple]:
    """(A Ray task.) For each (path, format, compression): its kept documents, counts, error, warnings."""
    from lmforge.corpus.documents import CorpusStats, Documents, read_file
    from lmforge.corpus.reading import ReadOptions

    results = []
    for path, fmt, compression in batch:
        warnings: list[str] = []
        recorder, stats = _Recorder(), CorpusStats()
        # Duplicates are the stage process's to find, across all files; here only the local rules.
        documents = Documents(recorder, stats, form, min_chars, dedupe=False)
        bad = read_file(documents, path, fmt, compression, ReadOptions(SimpleNamespace(**read_keys), warnings.append),
                        lambda n: None)
        results.append((recorder.kept, stats.documents_in, stats.bytes_in, stats.dropped_short, bad, warnings))
    return results


def prepare_on_ray(data_cfg, files: list, formats: list, documents, advance: Callable[[int], None]) -> None:
    """The prepare stage's reading on Ray: every file's documents passed to ``documents.keep`` in file order.

    ``documents`` is the stage's ``Documents`` (its splits, counts and the one dedup set).
    """
    from lmforge.corpus.cleaning import check_normal_form
    from lmforge.corpus.documents import skip_or_raise, warn
    from lmforge.corpus.reading import ReadOptions

    options = ReadOptions(data_cfg, warn)
    read_keys = {key: data_cfg[key] for key in ("decode_errors", "text_field", "column", "skip_bad_files")}
    form, min_chars = check_normal_form(data_cfg.normalize), int(data_cfg.min_chars)
    sizes = [path.stat().st_size for path in files]
    batches = _batches(list(zip(files, formats, sizes)))
    stats = documents.stats
    with RayRun(data_cfg) as run:
        task = run.ray.remote(_read_files)
        arguments = ([(path, *fmt) for path, fmt, _ in batch] for batch in batches)
        for batch, results in zip(batches, run.in_order(task, ((b, read_keys, form, min_chars) for b in arguments))):
            for (path, _, size), (kept, documents_in, bytes_in, short, bad, warnings) in zip(batch, results):
                for message in warnings:
                    warn(message)
                stats.documents_in += documents_in
                stats.bytes_in += bytes_in
                stats.dropped_short += short
                for chars, data, digest in kept:
                    documents.keep(chars, data, digest)
                skip_or_raise(bad, path, options, stats)
                advance(size)


def _batches(files: list[tuple]) -> list[list[tuple]]:
    """Consecutive files grouped up to ``_BATCH_BYTES`` each (a larger file alone)."""
    batches, current, size = [], [], 0
    for entry in files:
        if current and size + entry[2] > _BATCH_BYTES:
            batches.append(current)
            current, size = [], 0
        current.append(entry)
        size += entry[2]
    if current:
        batches.append(current)
    return batches


# --- tokenize --------------------------------------------------------------------------------

# A worker's encoders, by tokenizer hash: loaded once per worker process, not once per chunk.
_encoders: dict = {}


def _encode(encode_chunk: Callable, tokenizer_key: str, tokenizer_json: str, eot_id: int, dtype: str,
            chunk: str) -> bytes:
    """(A Ray task.) ``encode_chunk`` (the tokenize stage's own) of one chunk, as ``dtype`` bytes."""
    from lmforge.tokenization.tokenizer import Encoder

    if tokenizer_key not in _encoders:
        from tokenizers import Tokenizer

        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one worker per core already
        _encoders[tokenizer_key] = Encoder(Tokenizer.from_str(tokenizer_json))
    return encode_chunk(_encoders[tokenizer_key], chunk, eot_id).astype(np.dtype(dtype)).tobytes()


class RayEncoding:
    """Chunks of prepared text to token-id bytes on Ray, in chunk order (the tokenize stage's ``encoded``)."""

    def __init__(self, data_cfg, encode_chunk: Callable, tokenizer_path: Path, eot_id: int, dtype: np.dtype):
        from lmforge.tokenization.tokenizer import tokenizer_sha256

        self.encode_chunk = encode_chunk  # sent by reference (module and name), as Ray pickles functions
        self.run = RayRun(data_cfg)
        self.task = self.run.ray.remote(_encode)
        self.key = tokenizer_sha256(tokenizer_path)
        # Put once: every task gets a reference, not its own copy of the tokenizer.
        self.tokenizer_ref = self.run.ray.put(Path(tokenizer_path).read_text(encoding="utf-8"))
        self.eot_id, self.dtype = eot_id, np.dtype(dtype).name

    def encoded(self, chunks: Iterable[str]) -> Iterator[bytes]:
        """The ids of each chunk (as bytes), in order."""
        return self.run.in_order(self.task, ((self.encode_chunk, self.key, self.tokenizer_ref, self.eot_id,
                                              self.dtype, chunk) for chunk in chunks))

    def close(self) -> None:
        self.run.close()
