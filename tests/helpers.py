"""Shared test helpers: tiny corpora and models, a copy of the project, commands, servers.

Fixtures live in ``conftest.py`` files; everything else a test needs from another is here."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import torch

from lmforge.corpus.stage import prepare_stage
from lmforge.model.gpt import GPT, GPTConfig
from lmforge.tokenization.encode import tokenize_stage
from lmforge.tokenization.vocab import vocab_stage

ROOT = Path(__file__).resolve().parents[1]

VOCAB = 32  # the tiny models' vocabulary and context
BLOCK = 16


def write_corpus(directory: Path, n_docs: int = 20, words: int = 400) -> Path:
    """A small deterministic corpus of plain-text documents; returns the directory."""
    import random

    rng = random.Random(0)
    vocab = ["the", "king", "queen", "sword", "crown", "night", "love", "death", "speak", "lord", "fair", "good"]
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        lines = []
        for _ in range(words // 8):
            lines.append(" ".join(rng.choice(vocab) for _ in range(8)).capitalize() + ".")
        (directory / f"doc{i:03d}.txt").write_text(f"DOC {i}\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return directory


def lines(rng, n: int) -> str:
    """``n`` generated lines of words (some accented, some not Latin)."""
    words = ["the", "king", "queen", "café", "crown", "Ελλάδα", "love", "東京", "speak", "lord", "fair", "good"]
    return "\n".join(" ".join(rng.choice(words) for _ in range(9)).capitalize() + "." for _ in range(n)) + "\n"


def write_mixed_corpus(root: Path) -> Path:
    """Many small files of every format: plain (one with a BOM and CRLF), JSONL, Parquet, gzip/bz2/xz/zstd,
    with exact duplicates across files and formats, and documents too short to keep."""
    import bz2
    import gzip
    import lzma
    import random

    import orjson
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    rng = random.Random(1)
    root.mkdir(parents=True)
    shared = lines(rng, 20)  # the same document in several files: exact dedup must keep only the first
    for i in range(12):
        text = shared if i % 5 == 0 else lines(rng, 30 + i)
        data = text.encode("utf-8")
        name = root / f"a{i:02d}_book.txt"
        if i % 4 == 1:
            data = b"\xef\xbb\xbf" + data.replace(b"\n", b"\r\n")
        if i % 4 == 2:
            Path(f"{name}.gz").write_bytes(gzip.compress(data))
        elif i % 4 == 3:
            Path(f"{name}.{'bz2' if i % 8 == 3 else 'xz'}").write_bytes(
                bz2.compress(data) if i % 8 == 3 else lzma.compress(data))
        else:
            name.write_bytes(data)
    (root / "b_book.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(lines(rng, 25).encode()))
    for shard in range(3):
        records = [{"text": lines(rng, 3 + j % 4)} for j in range(40)] + [{"text": "x"}, {"text": shared}]
        payload = b"".join(orjson.dumps(r) + b"\n" for r in records)
        target = root / f"c_web_{shard}.jsonl"
        target.write_bytes(payload) if shard != 1 else Path(f"{target}.gz").write_bytes(gzip.compress(payload))
    rows = [lines(rng, 2 + j % 3) for j in range(60)] + [shared, "", "y"]
    pq.write_table(pa.table({"text": rows, "id": list(range(len(rows)))}), root / "d_rows.parquet")
    return root


BIN = Path(sys.executable).parent


PROJECT_FILES = ("conf", "pipelines", "src", "dvc.yaml", "params.yaml", ".dvc", ".gitignore", "pyproject.toml")


# The whole pipeline in seconds per stage on a CPU (the default corpus, a tiny model, 10 steps).
TINY_PIPELINE = ("model=tiny", "train.max_steps=10", "train.eval_interval=10", "train.eval_iters=2",
                 "train.log_every=5", "evaluate.max_batches=2", "evaluate.max_new_tokens=20")


def run_command(cmd: list[str], cwd: Path, check: bool = True, timeout: float = 600,
                env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` in ``cwd`` with the virtualenv first on PATH and no DVC run variables inherited.

    With ``check``, a non-zero exit fails the test with the command's output.
    """
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DVC_")}
    full_env = {**clean, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "MLFLOW_DISABLE_TELEMETRY": "true",
                **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def copy_project(dest: Path, overrides: tuple[str, ...] | list[str] = ()) -> Path:
    """A git + DVC copy of the project at ``dest``, params.yaml composed with ``overrides``, all committed."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name,
                            ignore=shutil.ignore_patterns("tmp", "cache", "__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, dest / name)
    run_command(["git", "init", "-q"], dest)
    # DVC commits experiments itself: it needs an identity even where git has no global one.
    run_command(["git", "config", "user.email", "tests@lmforge.invalid"], dest)
    run_command(["git", "config", "user.name", "lmforge tests"], dest)
    run_command([str(BIN / "lmforge"), "compose", *overrides], dest)
    commit_all(dest, "project copy")
    return dest


def commit_all(project: Path, message: str) -> None:
    """``git add -A && git commit`` in ``project`` (nothing to commit is fine)."""
    run_command(["git", "add", "-A"], project)
    run_command(["git", "commit", "-qm", message], project, check=False)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(store: Path, timeout: float = 90) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1 with a SQL store and an artifact root in ``store``; yields its URL.

    One worker and no job runner (it would start seven more processes); stopped with SIGTERM to
    its process group on exit.
    """
    store.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
           "--artifacts-destination", str(store / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "MLFLOW_DISABLE_TELEMETRY": "true",
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(store / "server.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError as err:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        f"mlflow server did not start:\n{(store / 'server.log').read_text()[-3000:]}") from err
                time.sleep(0.3)
        yield url
    finally:
        stop_process_group(proc)
        log.close()


def stop_process_group(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM a server started with ``start_new_session=True`` and its children; SIGKILL if it lingers."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def assert_learned(loss: float, first_loss: float, vocab_size: int, margin: float = 0.2) -> None:
    """``loss`` (after training) is what training must achieve: well below a uniform guess over
    the vocabulary (ln V) and below the loss of the same run's first step, by ``margin`` nats
    each. An untrained model scores about ln V, so it cannot pass."""
    import math

    uniform = math.log(vocab_size)
    assert loss < uniform - margin, f"loss {loss:.4f} is not well below uniform ln({vocab_size}) = {uniform:.4f}"
    assert loss < first_loss - margin, f"loss {loss:.4f} is not below the first step's {first_loss:.4f}"


def first_train_loss(model_dir: Path) -> float:
    """The training loss logged at step 1 (the initial weights on the first batch) in ``model_dir/curves``."""
    import csv

    with open(Path(model_dir) / "curves" / "train_loss.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and rows[0]["step"] == "1", "the first step's loss is not in the curves"
    return float(rows[0]["train_loss"])


LLAMA_STYLE = dict(
    positions="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False, tie_embeddings=False
)


def tiny_model(dtype=torch.float64, seed: int = 0, **overrides) -> GPT:
    # float64 where two computations must pick the same argmax: no near-tie can flip a token.
    settings = dict(vocab_size=VOCAB, block_size=BLOCK, n_layer=2, n_head=4, n_embd=32)
    settings.update(overrides)
    torch.manual_seed(seed)
    return GPT(GPTConfig(**settings)).to(dtype).eval()


CHAR_TEXT = "the king and the queen speak of love and death.\nGood night, fair lord!\n"


def make_model_dir(path, seed: int = 0, **overrides):
    """A small random model directory with a character vocabulary of CHAR_TEXT; returns its path."""
    from lmforge.model.directory import save_model_dir
    from lmforge.tokenization.tokenizer import save_tokenizer
    from lmforge.tokenization.vocab import build_tokenizer

    tokenizer = build_tokenizer({"kind": "char", "special_tokens": ["<|endoftext|>", "<unk>"]}, [CHAR_TEXT])
    save_tokenizer(tokenizer, path.parent / f"{path.name}-tokenizer.json")
    settings = dict(vocab_size=tokenizer.get_vocab_size(), block_size=BLOCK, n_layer=2, n_head=4, n_embd=32)
    settings.update(overrides)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**settings))
    meta = {"kind": "char", "eot_token": "<|endoftext|>", "eot_id": tokenizer.token_to_id("<|endoftext|>")}
    return save_model_dir(path, model, path.parent / f"{path.name}-tokenizer.json", meta)


def run_cli(args, capsys):
    """``lmforge ARGS`` in this process; returns (exit status, stdout, stderr)."""
    from lmforge.cli.main import main

    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exit:
        code = exit.code
    out = capsys.readouterr()
    return code, out.out, out.err


def run_pipeline(cfg, corpus: Path) -> dict:
    """The five stages in-process on ``corpus`` with config ``cfg``; returns the evaluate metrics."""
    from lmforge.evaluation.stage import evaluate_stage
    from lmforge.training.stage import train_stage

    cfg.data.sources = [str(corpus)]
    prepare_stage(cfg)
    vocab_stage(cfg)
    tokenize_stage(cfg)
    train_stage(cfg)
    return evaluate_stage(cfg)


def make_project(directory: Path, overrides: list[str]) -> Path:
    """A project directory: params.yaml composed from the real conf/ plus ``overrides``, and the
    prepared, tokenized splits of a small generated corpus."""
    from lmforge.config.compose import compose_config, write_params

    directory.mkdir(parents=True)
    cfg = compose_config(overrides, conf_dir=ROOT / "conf")
    with contextlib.chdir(directory):
        cfg.data.sources = [str(write_corpus(Path("corpus"), n_docs=12, words=300))]
        prepare_stage(cfg)
        vocab_stage(cfg)
        tokenize_stage(cfg)
        write_params(cfg)
    return directory


def run_record(cfg) -> dict:
    return json.loads(Path(cfg.paths.checkpoints, "run.json").read_text())


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    return run_command(cmd, cwd, check=check)


def wait_until_healthy(proc: subprocess.Popen, url: str, tries: int = 300) -> None:
    """Poll ``url``/health every 0.2 s until it answers 200; fail with the server's output if it exits."""
    for _ in range(tries):
        assert proc.poll() is None, proc.stdout.read()
        with contextlib.suppress(OSError):
            if urllib.request.urlopen(f"{url}/health", timeout=5).status == 200:
                return
        time.sleep(0.2)
