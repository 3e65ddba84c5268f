"""data.engine=ray: the same bytes as the local engine, exact dedup across workers, a killed worker, errors.

One small local Ray (2 CPUs, a 200 MB object store, no dashboard) is shared by the whole test
session and stopped at its end.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
import ray  # (the ray extra is in the test extra: a missing Ray fails here, never skips)

from lmforge.config.compose import compose_config
from lmforge.corpus.cleaning import clean
from lmforge.corpus.stage import prepare_stage
from lmforge.errors import LmforgeError
from lmforge.tokenization.encode import tokenize_stage
from lmforge.tokenization.vocab import vocab_stage
from tests.helpers import ROOT, write_mixed_corpus
from tests.helpers import lines as _lines


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray for the session: small, no dashboard, stopped at the end."""
    ray.init(num_cpus=2, object_store_memory=200 << 20, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _cfg(workdir: Path, sources, *overrides: str):
    cfg = compose_config(["tokenizer=bpe", "tokenizer.vocab_size=300", "data.min_chars=2", *overrides],
                         conf_dir=ROOT / "conf")
    for key in ("prepared", "vocab", "tokens", "reports"):
        cfg.paths[key] = str(workdir / key)
    cfg.data.sources = [str(s) for s in sources]
    return cfg


def _tree(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` (relative path) with the hash of its bytes."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("split", ["document", "position"])
def test_ray_writes_the_local_engines_bytes_on_a_mixed_corpus(local_ray, tmp_path, split):
    corpus = write_mixed_corpus(tmp_path / "corpus")
    local = _cfg(tmp_path / "local", [corpus], f"data.split={split}", "data.val_fraction=0.3", "data.shard_size=2000")
    # The same folder as a file:// URL: read through fsspec's listing, it must give the same files in the same order.
    on_ray = _cfg(tmp_path / "ray", [f"file://{corpus}"], f"data.split={split}", "data.val_fraction=0.3",
                  "data.shard_size=2000", "data.engine=ray", "data.workers=2")
    stats = prepare_stage(local)
    assert stats.files == 17 and stats.duplicates >= 4 and stats.dropped_short >= 4
    prepare_stage(on_ray)
    assert _tree(tmp_path / "ray/prepared") == _tree(tmp_path / "local/prepared")
    assert (tmp_path / "ray/reports/prepare.json").read_text() == (tmp_path / "local/reports/prepare.json").read_text()
    # Tokenize both from the same vocabulary, so any difference is the engine's.
    vocab_stage(local)
    on_ray.paths.vocab = local.paths.vocab
    tokenize_stage(local)
    tokenize_stage(on_ray)
    shards = _tree(tmp_path / "local/tokens")
    assert len(shards) > 3  # several shards: the cut points are compared too
    assert _tree(tmp_path / "ray/tokens") == shards


class CountCalls:
    """A function that counts its calls on itself: each worker's count runs 1, 2, 3, ... only if the
    worker kept the one copy it fetched, rather than unpickling the function per task."""

    def __init__(self):
        self.calls = 0

    def __call__(self, item: int) -> tuple[int, int, int]:
        self.calls += 1
        return item, os.getpid(), self.calls


def test_the_ray_engine_installs_the_function_once_per_worker_and_keeps_the_order(local_ray, tmp_path):
    from lmforge.engines.choice import open_engine
    from lmforge.engines.ray import RayEngine

    with open_engine(_cfg(tmp_path, [], "data.engine=ray", "data.workers=2").data, CountCalls(), "count") as engine:
        assert isinstance(engine, RayEngine) and not engine.started  # the session's Ray, used as it is
        results = list(engine.map(range(80)))
    assert [item for item, _, _ in results] == list(range(80))
    per_worker = Counter(pid for _, pid, _ in results)
    assert os.getpid() not in per_worker
    for pid, count in per_worker.items():
        assert sorted(calls for _, p, calls in results if p == pid) == list(range(1, count + 1))


def test_a_task_reads_a_long_document_in_pieces_as_the_local_engine_does(tmp_path, monkeypatch):
    from lmforge.corpus import reading
    from lmforge.corpus.batches import read_batch

    monkeypatch.setattr(reading, "BLOCK_BYTES", 64)  # (in this process: the task function runs here)
    text = "Line one\r\nline two café\x07\n" * 40
    path = tmp_path / "long.txt"
    path.write_bytes(text.encode("utf-8"))
    keys = {"decode_errors": "strict", "text_field": "text", "column": "text", "skip_bad_files": False}
    [(kept, documents_in, bytes_in, short, bad, warnings)] = read_batch(keys, "NFC", 1, [(path, "text", None)])
    cleaned, data, _ = clean(text, None, "NFC")
    assert (documents_in, bytes_in, short, bad, warnings) == (1, len(text.encode()), 0, None, [])
    assert kept == [(len(cleaned), data, hashlib.blake2b(data, digest_size=16).digest())]


@pytest.mark.slow
def test_a_killed_worker_is_retried_and_the_tokens_stay_the_same(local_ray, tmp_path):
    import random

    rng = random.Random(2)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "train.txt").write_text("\x1e".join(_lines(rng, 40) for _ in range(300)), encoding="utf-8")
    local = _cfg(tmp_path / "local", [corpus])
    on_ray = _cfg(tmp_path / "ray", [corpus], "data.engine=ray")
    prepare_stage(local)
    vocab_stage(local)
    # The prepared text repeated to about 12 MB: a dozen 1M-character chunks, i.e. a dozen tasks.
    big = tmp_path / "big"
    big.mkdir()
    for split in ("train", "val"):
        text = (Path(local.paths.prepared) / f"{split}.txt").read_text(encoding="utf-8")
        (big / f"{split}.txt").write_text("\x1e".join([text] * max(1, (10 << 20) // len(text))), encoding="utf-8")
    local.paths.prepared = on_ray.paths.prepared = str(big)
    on_ray.paths.vocab = local.paths.vocab
    tokenize_stage(local)

    killed: list[int] = []
    done = threading.Event()

    def kill_one_busy_worker() -> None:
        while not done.is_set() and not killed:
            for proc in psutil.Process().children(recursive=True):
                try:
                    if proc.cmdline()[:1] == ["ray::tokenize"]:  # a task, named after its stage
                        os.kill(proc.pid, signal.SIGKILL)
                        killed.append(proc.pid)
                        return
                except (psutil.Error, IndexError):
                    pass
            time.sleep(0.005)

    killer = threading.Thread(target=kill_one_busy_worker)
    killer.start()
    try:
        tokenize_stage(on_ray)
    finally:
        done.set()
        killer.join()
    assert killed, "no worker was caught running an encoding task"
    assert _tree(tmp_path / "ray/tokens") == _tree(tmp_path / "local/tokens")


def test_a_bad_file_fails_a_ray_run_with_the_local_sentence_and_writes_nothing(local_ray, tmp_path):
    corpus = write_mixed_corpus(tmp_path / "corpus")
    (corpus / "c_web_2.jsonl").write_bytes(b'{"text": "fine"}\n{"text": broken\n')
    errors = {}
    for engine in ("local", "ray"):
        cfg = _cfg(tmp_path / engine, [corpus], f"data.engine={engine}")
        Path(cfg.paths.prepared).mkdir(parents=True)
        (Path(cfg.paths.prepared) / "train.txt").write_text("the previous output")
        with pytest.raises(LmforgeError) as err:
            prepare_stage(cfg)
        errors[engine] = str(err.value)
        assert [p.name for p in (tmp_path / engine).iterdir()] == ["prepared"]  # no temporary left, no report
        assert (Path(cfg.paths.prepared) / "train.txt").read_text() == "the previous output"
    assert errors["ray"] == errors["local"]
    assert "c_web_2.jsonl line 2 is not valid JSON" in errors["ray"]


def _prepare_cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    paths = [f"paths.{key}={tmp_path / key}" for key in ("prepared", "reports")]
    return subprocess.run([sys.executable, "pipelines/prepare.py", *paths, *overrides], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.slow
@pytest.mark.parametrize("listening", [False, True], ids=["nothing-listens", "a-port-that-never-speaks-ray"])
def test_an_unreachable_ray_address_is_one_sentence_not_a_hang(tmp_path, listening):
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    if listening:  # the kernel accepts connections; nobody ever answers on them
        silent.listen(8)
    address = f"{'ray://' if listening else ''}127.0.0.1:{silent.getsockname()[1]}"
    try:  # _prepare_cli's timeout only guards against a hang; the bounds are asserted below, not the wall time
        result = _prepare_cli(tmp_path, "data.engine=ray", f"data.ray_address={address}")
    finally:
        silent.close()
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"data.ray_address='{address}'" in lines[0] and "ray start --head" in lines[0], result.stderr
    from lmforge.engines.ray import _JOIN_SECONDS

    # What keeps it short: a refused connection ends at once; a port that never speaks Ray is given
    # _JOIN_SECONDS, and the sentence says so.
    assert ("nothing answers at" in lines[0]) if not listening else (f"within {_JOIN_SECONDS} s" in lines[0])
    assert not (tmp_path / "prepared").exists()


def test_the_connection_probe_is_given_seconds(monkeypatch):
    import socket

    from lmforge.engines import ray as engine

    asked = []

    def refuse(address, timeout=None):
        asked.append((address, timeout))
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(socket, "create_connection", refuse)
    with pytest.raises(LmforgeError, match="nothing answers at 10.0.0.1:6379"):
        engine._connect(None, "10.0.0.1:6379")
    assert asked == [(("10.0.0.1", 6379), engine._CONNECT_SECONDS)] and 0 < engine._CONNECT_SECONDS <= 10
    assert 0 < engine._JOIN_SECONDS <= 30


def test_an_unknown_engine_is_one_sentence(tmp_path):
    result = _prepare_cli(tmp_path, "data.engine=spark")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == ["error: data.engine='spark' is not one of local, ray."], result.stderr


def test_ray_is_imported_only_when_the_ray_engine_runs(tmp_path):
    # Every module of the data stages and of the engines imported, and the stages run locally: no Ray.
    corpus = write_mixed_corpus(tmp_path / "corpus")
    overrides = [f"data.sources=[{corpus}]", "data.min_chars=2", "tokenizer=char",
                 *(f"paths.{key}={tmp_path / key}" for key in ("prepared", "vocab", "tokens", "reports"))]
    code = ("import sys, lmforge.corpus.stage, lmforge.corpus.batches, lmforge.tokenization.encode, "
            "lmforge.engines.choice, lmforge.engines.ray; from lmforge.stages.runner import run_stage; "
            f"[run_stage(stage, {overrides!r}) for stage in ('prepare', 'vocab', 'tokenize')]; "
            "print('ray' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120,
                            cwd=ROOT)
    assert result.stdout.strip().splitlines()[-1] == "False"
    assert (tmp_path / "tokens/index.json").is_file()


def test_the_ray_engine_without_ray_installed_is_one_sentence(tmp_path, monkeypatch):
    from lmforge.engines.choice import open_engine

    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets where Ray is not installed
    with pytest.raises(LmforgeError,
                       match=r"^data.engine=ray needs the `ray` extra: pip install 'lmforge\[ray\]' "
                             r"\(or set data.engine=local\)$"):
        open_engine(_cfg(tmp_path, [], "data.engine=ray").data, len, "prepare")


@pytest.mark.slow
def test_chat_records_pack_to_the_same_bytes_in_process_in_a_pool_and_on_ray(local_ray, tmp_path, monkeypatch):
    from lmforge.tokenization import records
    from tests.integration.test_chat import write_chat_data

    data = write_chat_data(tmp_path / "chat.jsonl")
    chat = ("data.format=chat", "data.skip_bad_records=true", "model.block_size=64", "data.shard_size=500")
    alone = _cfg(tmp_path / "alone", [data], *chat)
    prepare_stage(alone)
    vocab_stage(alone)
    tokenize_stage(alone)
    monkeypatch.setattr(records, "_BATCH_RECORDS", 5)
    monkeypatch.setattr(records, "_PARALLEL_MIN_BYTES", 0)
    for engine in ("local", "ray"):
        cfg = _cfg(tmp_path / engine, [data], *chat, f"data.engine={engine}", "data.workers=2")
        cfg.paths.prepared, cfg.paths.vocab = alone.paths.prepared, alone.paths.vocab
        tokenize_stage(cfg)
        assert _tree(tmp_path / engine / "tokens") == _tree(tmp_path / "alone" / "tokens"), engine
