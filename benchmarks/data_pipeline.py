"""Speed and memory of the first three stages (prepare, vocab, tokenize) on synthetic corpora.

    python benchmarks/data_pipeline.py                      # 10 MB, 100 MB and 1 GB
    python benchmarks/data_pipeline.py --sizes 10MB,100MB   # a quick run
    python benchmarks/data_pipeline.py --sizes 100MB --engine local,ray   # both engines, one run
    python benchmarks/data_pipeline.py --sizes 100MB --engine ray --ray-address auto   # on a running cluster

For each size a corpus is generated into a temporary folder (deleted afterwards unless --keep):
half of its bytes are "books" (plain-text files of about 300 KB, one in ten with a byte-order mark
and CRLF line ends), half "web pages" in JSONL shards (documents of about 3 KB, 1% of them exact
duplicates). The words follow a Zipf law over a generated vocabulary of realistic English word
lengths, with punctuation, line breaks and a few accented and non-Latin words.

Each stage runs as the pipeline runs it (the real config, ``tokenizer=bpe``, ``data.split=document``)
in its own subprocess. Reported per stage: MB/s (UTF-8 text bytes the stage reads, per second of
the stage itself, interpreter start-up excluded), the peak resident memory of the stage's main
process (the kernel's high-water mark, VmHWM) and of the stage's whole process tree (psutil,
sampled every 0.1 s: the main process plus its tokenize workers, summed). For comparison,
HuggingFace's ``encode_batch`` over lines in
one process is timed on the same text.

With ``--engine local,ray`` prepare and tokenize run once per engine on the same corpus (the vocab
stage once, shared), and the outputs of each engine are compared byte for byte with the first's.
A ``ray`` stage without ``--ray-address`` starts (and stops) its own local Ray, whose start-up is
part of its seconds and whose processes (GCS, raylet, workers) are part of its process tree; with
``--ray-address`` it joins a running cluster, whose processes are not counted. The table is printed
and written as JSON to
benchmarks/results/data_pipeline.json. The cores may be shared with other work: compare numbers
from one run, not across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "data_pipeline.json"
STAGES = ("prepare", "vocab", "tokenize")
UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9}


# --- the synthetic corpus --------------------------------------------------------------------


def _word_table(rng: np.random.Generator):
    """Words and separators as one byte table, with Zipf probabilities for the words."""
    letters = np.frombuffer(b"etaoinshrdlcumwfgypbvkjxqz", dtype=np.uint8)
    letter_p = np.array([12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4, 2.4, 2.2, 2.0,
                         2.0, 1.9, 1.5, 1.0, 0.8, 0.15, 0.15, 0.1, 0.07])
    lengths = np.clip(rng.poisson(4.0, 40_000) + 1, 1, 16)  # English averages about 4.7 letters a word
    words = sorted({bytes(rng.choice(letters, n, p=letter_p / letter_p.sum())).decode() for n in lengths})
    rng.shuffle(words)
    words += [w.capitalize() for w in words[:3000]]
    words += ["café", "naïve", "über", "señor", "façade", "Zürich", "Ελλάδα", "Москва", "東京", "😀"]
    separators = [" ", ", ", ". ", ".\n", "\n\n", "; ", "! ", "? ", ":\n", " - ", "'s "]
    separator_p = np.array([78, 6, 5, 4, 1.2, 1, 0.8, 0.8, 0.6, 0.6, 2.0])
    pieces = [w.encode() for w in words] + [s.encode() for s in separators]
    sizes = np.array([len(p) for p in pieces])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    word_p = 1.0 / (np.arange(len(words)) + 2.7) ** 1.07
    return (np.frombuffer(b"".join(pieces), dtype=np.uint8), starts, sizes, len(words),
            np.cumsum(word_p / word_p.sum()), np.cumsum(separator_p / separator_p.sum()))


class _Text:
    """An endless stream of generated UTF-8 text, made 8 MB at a time with numpy."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.table = _word_table(self.rng)
        self.buffer = b""
        self.position = 0

    def _more(self, words: int = 1_500_000) -> bytes:
        flat, starts, sizes, n_words, word_cdf, separator_cdf = self.table
        chosen = np.empty(2 * words, dtype=np.int64)
        chosen[0::2] = np.minimum(np.searchsorted(word_cdf, self.rng.random(words)), n_words - 1)
        chosen[1::2] = n_words + np.minimum(np.searchsorted(separator_cdf, self.rng.random(words)),
                                            len(separator_cdf) - 1)
        lengths = sizes[chosen]
        ends = np.cumsum(lengths)
        index = np.repeat(starts[chosen] - (ends - lengths), lengths) + np.arange(int(ends[-1]))
        return flat[index].tobytes()

    def take(self, size: int) -> bytes:
        """About ``size`` bytes, ending just before a space (so never inside a character)."""
        while len(self.buffer) - self.position < size + 100:
            self.buffer = self.buffer[self.position:] + self._more()
            self.position = 0
        end = self.buffer.find(b" ", self.position + size)
        document = self.buffer[self.position:end]
        self.position = end + 1
        return document


def write_corpus(directory: Path, size: int, seed: int = 0) -> dict:
    """Generate a corpus of about ``size`` bytes of text into ``directory``; return what it holds."""
    import orjson

    text = _Text(seed)
    rng = np.random.default_rng(seed + 1)
    books, web = directory / "books", directory / "web"
    books.mkdir(parents=True)
    web.mkdir()
    written = n_books = n_pages = 0
    while written < size // 2:
        document = text.take(int(rng.lognormal(np.log(300_000), 0.5)))
        if n_books % 10 == 3:  # a Windows export: byte-order mark and CRLF line ends
            document = b"\xef\xbb\xbf" + document.replace(b"\n", b"\r\n")
        (books / f"book_{n_books:05d}.txt").write_bytes(document)
        written += len(document)
        n_books += 1
    shard = None
    recent: list[bytes] = []
    while written < size:
        if shard is None or shard.tell() > 64 << 20:
            if shard:
                shard.close()
            shard = open(web / f"pages_{n_pages:08d}.jsonl", "wb")
        if recent and rng.random() < 0.01:
            line = recent[int(rng.integers(len(recent)))]  # an exact duplicate of a recent page
        else:
            document = text.take(int(rng.lognormal(np.log(3000), 0.8)) + 20)
            line = orjson.dumps({"id": n_pages, "text": document.decode("utf-8")}) + b"\n"
            recent = (recent + [line])[-1000:]
            written += len(document)
        shard.write(line)
        n_pages += 1
    if shard:
        shard.close()
    on_disk = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
    return {"text_bytes": written, "bytes_on_disk": on_disk, "books": n_books, "web_pages": n_pages}


# --- running a stage -------------------------------------------------------------------------


def _overrides(workdir: Path, corpus: Path, vocab: Path, engine: str = "local", ray_address: str | None = None,
               workers: int | None = None) -> list[str]:
    overrides = [
        f"data.sources=[{corpus}]", "data.split=document", "tokenizer=bpe", f"data.engine={engine}",
        f"paths.prepared={workdir}/prepared", f"paths.vocab={vocab}", f"paths.tokens={workdir}/tokens",
        f"paths.reports={workdir}/reports",
    ]
    if ray_address:
        overrides.append(f"data.ray_address={ray_address}")
    if workers:
        overrides.append(f"data.workers={workers}")
    return overrides


def _tree_digest(directory: Path) -> str:
    """One hash of every file's relative path and bytes under ``directory``."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(directory)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def run_stage_here(stage: str, overrides: list[str]) -> None:
    """(In the subprocess.) Run one stage and print its time and peak memory as JSON."""
    from lmforge.config.compose import load_config
    from lmforge.stages.runner import stage_function

    cfg = load_config(overrides)
    start, cpu = time.perf_counter(), time.process_time()
    stage_function(stage)(cfg)
    seconds = time.perf_counter() - start
    # The stage process's own CPU time: near ``seconds`` means it, not the workers, sets the pace.
    print(json.dumps({"seconds": seconds, "main_cpu_seconds": time.process_time() - cpu,
                      "main_rss_mb": _peak_rss_mb()}))


def _peak_rss_mb() -> float:
    # The kernel's high-water mark of this process's resident memory. (getrusage's ru_maxrss
    # would do, but Linux carries it across exec: it would report the benchmark's own peak.)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e6
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


def measure_stage(stage: str, overrides: list[str]) -> dict:
    """Run ``stage`` in a subprocess; its timings plus the peak RSS of its process tree."""
    import psutil

    env = {**os.environ, "CI": "1"}  # no progress bars in the measured output
    proc = subprocess.Popen([sys.executable, __file__, "--run-stage", stage, "--", *overrides], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        parent = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                tree = [parent, *parent.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{stage} failed ({proc.returncode}):\n{out[-2000:]}\n{err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result["tree_rss_mb"] = peak / 1e6
    ready = re.search(r"^ray: .* ready in ([0-9.]+) s", err, re.MULTILINE)  # Ray's start-up, inside the seconds
    result["ray_start_seconds"] = float(ready.group(1)) if ready else 0.0
    return result


def hf_encode_batch_speed(text_path: Path, tokenizer_path: Path, size: int = 20 << 20) -> float:
    """MB/s of HuggingFace encode_batch over lines, in this process (the issue's 3.6 MB/s anchor)."""
    from tokenizers import Tokenizer

    with open(text_path, encoding="utf-8") as f:
        text = f.read(size).replace("\x1e", "\n")
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    lines = text.split("\n")
    start = time.perf_counter()
    tokenizer.encode_batch(lines, add_special_tokens=False)
    return len(text.encode("utf-8")) / (time.perf_counter() - start) / 1e6


# --- the benchmark ---------------------------------------------------------------------------


def parse_size(text: str) -> int:
    text = text.strip().upper()
    for unit, factor in UNITS.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def benchmark(size: int, base: Path, keep: bool, engines: list[str], ray_address: str | None = None,
              workers: int | None = None) -> dict:
    label = f"{size / 1e6:g} MB" if size < 10**9 else f"{size / 1e9:g} GB"
    workdir = Path(tempfile.mkdtemp(prefix=f"lmforge-bench-{size}-", dir=base))
    try:
        start = time.perf_counter()
        corpus = write_corpus(workdir / "corpus", size)
        corpus["generate_seconds"] = time.perf_counter() - start
        print(f"[{label}] corpus: {corpus}", flush=True)
        row = {"size": label, "corpus": corpus, "engines": {}}
        vocab = workdir / "vocab"
        for engine in engines:
            out = workdir / engine
            overrides = _overrides(out, workdir / "corpus", vocab, engine, ray_address if engine == "ray" else None,
                                   workers)
            stages = {}
            for stage in STAGES:
                if stage == "vocab" and vocab.exists():
                    continue  # one vocabulary for every engine, so their tokens can be compared
                stages[stage] = measure_stage(stage, overrides)
                print(f"[{label}] {engine} {stage}: {stages[stage]}", flush=True)
            prepared = json.loads((out / "reports/prepare.json").read_text())
            text_in = {"prepare": prepared["bytes_in"], "vocab": prepared["train_bytes"] + prepared["val_bytes"],
                       "tokenize": prepared["train_bytes"] + prepared["val_bytes"]}
            for stage, result in stages.items():
                result["text_mb"] = text_in[stage] / 1e6
                result["mb_per_second"] = text_in[stage] / 1e6 / result["seconds"]
            row["engines"][engine] = {"stages": stages, "prepare_report": prepared,
                                      "prepared_sha256": _tree_digest(out / "prepared"),
                                      "tokens_sha256": _tree_digest(out / "tokens")}
        first = row["engines"][engines[0]]
        for result in row["engines"].values():
            result["same_bytes_as_" + engines[0]] = (result["prepared_sha256"] == first["prepared_sha256"]
                                                     and result["tokens_sha256"] == first["tokens_sha256"])
        row["hf_encode_batch_mb_per_second"] = hf_encode_batch_speed(
            workdir / engines[0] / "prepared/train.txt", vocab / "tokenizer.json")
        return row
    finally:
        if keep:
            print(f"[{label}] kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def table(rows: list[dict]) -> str:
    lines = ["| corpus | engine | stage | text MB | seconds | of which Ray start | main process CPU s | MB/s "
             "| peak RSS main (MB) | peak RSS all processes (MB) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        for engine, result in row["engines"].items():
            for stage, r in result["stages"].items():
                lines.append(f"| {row['size']} | {engine} | {stage} | {r['text_mb']:,.0f} | {r['seconds']:.1f} | "
                             f"{r['ray_start_seconds']:.1f} | {r['main_cpu_seconds']:.1f} | "
                             f"{r['mb_per_second']:.1f} | {r['main_rss_mb']:,.0f} | {r['tree_rss_mb']:,.0f} |")
    lines.append("")
    for row in rows:
        engines = list(row["engines"])
        if len(engines) > 1:
            same = all(result[f"same_bytes_as_{engines[0]}"] for result in row["engines"].values())
            lines.append(f"{row['size']}: prepared and tokens of {', '.join(engines)} byte-identical: {same}")
    lines.append("HuggingFace encode_batch over lines, one process, same text: " + ", ".join(
        f"{row['size']}: {row['hf_encode_batch_mb_per_second']:.1f} MB/s" for row in rows))
    return "\n".join(lines)


def machine() -> str:
    """The CPU model and the cores this process may use, e.g. for the results' header."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU") if Path("/proc/cpuinfo").exists() else "unknown CPU"
    from lmforge.engines.workers import default_workers

    return f"{model}, {default_workers()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10MB,100MB,1GB", help="comma-separated corpus sizes (e.g. 10MB,100MB)")
    parser.add_argument("--workdir", default=None, help="where corpora are generated (default: the system temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the generated corpora and outputs")
    parser.add_argument("--engine", default="local", help="comma-separated data.engine values to run (local,ray)")
    parser.add_argument("--ray-address", default=None,
                        help="data.ray_address for the ray engine (default: a local Ray)")
    parser.add_argument("--workers", type=int, default=None,
                        help="data.workers (default: every core, or the cluster's CPUs)")
    parser.add_argument("--out", default=str(RESULTS), help="where the JSON goes")
    parser.add_argument("--run-stage", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_stage:
        run_stage_here(args.run_stage, args.overrides)
        return
    base = Path(args.workdir or tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    engines = args.engine.split(",")
    load_before = os.getloadavg()
    rows = [benchmark(parse_size(s), base, args.keep, engines, args.ray_address, args.workers)
            for s in args.sizes.split(",")]
    report = table(rows)
    print(f"{machine()}; load average before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f}")
    print(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "cpu_count": os.cpu_count(), "load_average_before": load_before,
                                   "load_average_after": os.getloadavg(), "ray_address": args.ray_address,
                                   "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
