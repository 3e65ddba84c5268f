"""lm-evaluation-harness's ``local-completions`` model pointed at `lmforge serve` (issue 19 item 4):
its log-likelihoods, read from ``echo`` + ``logprobs`` answers and tokenized by the server's own
tokenizer (vLLM's /tokenize and /tokenizer_info), equal what ``lmforge evaluate`` computes on the
same text. A task file written here over a local JSONL file; no network (HF offline)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lmforge.evaluation.text import evaluate_text
from lmforge.model.directory import load_model_dir
from tests.integration.test_openai_server import BLOCK, NAME, make_model_dir, server  # noqa: F401

pytest.importorskip("lm_eval", reason="lm-eval is in the test extra")

# lm-eval sends at most max_length - 1 tokens (context and continuation, left-truncated): with
# BLOCK + 2 a request fits one window of the model, as evaluate scores a text of BLOCK + 1 tokens.
MAX_LENGTH = BLOCK + 2
DOCS = [("the king", " is dead"), ("Fair lord,", " good night."), ("what light through", " yonder window breaks"),
        ("a" * (BLOCK + 8), "bbbbb")]  # the last: more than the model's context: lm-eval left-truncates it
# (No context ends in whitespace: evaluate reads a file as a document and trims it.)

TASK = """task: lmforge_ll
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
target_delimiter: ""
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
"""

RUN = """import json, sys
import lm_eval
from lm_eval.tasks import TaskManager
url, name, max_length, include, out = sys.argv[1:6]
results = lm_eval.simple_evaluate(
    model="local-completions",
    model_args={"base_url": f"{url}/v1/completions", "model": name, "tokenizer_backend": "remote",
                "max_length": int(max_length), "num_concurrent": 1, "max_retries": 1, "batch_size": 2},
    tasks=["lmforge_ll"], task_manager=TaskManager(include_path=include), log_samples=True)
samples = results["samples"]["lmforge_ll"]
json.dump([{"doc": s["doc"], "resps": s["resps"]} for s in samples], open(out, "w"))
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):  # the server fixture's model
    return make_model_dir(tmp_path_factory.mktemp("serve") / "model")


def evaluate_nats(loaded, text: str, tmp_path) -> float:
    """The summed loss (nats) ``lmforge evaluate`` gives ``text``."""
    path = tmp_path / "text.txt"
    path.write_text(text, encoding="utf-8")
    metrics = evaluate_text(loaded, [str(path)])
    return metrics["loss"] * (metrics["tokens"] - 1)


def test_lm_eval_local_completions_log_likelihoods_equal_lmforge_evaluate(server, model_dir, tmp_path):  # noqa: F811
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"context": c, "continuation": x}) + "\n" for c, x in DOCS), encoding="utf-8")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "lmforge_ll.yaml").write_text(TASK.format(data=data), encoding="utf-8")
    out = tmp_path / "samples.json"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf"),
           "OPENAI_API_KEY": "unused"}
    run = subprocess.run([sys.executable, "-c", RUN, server, NAME, str(MAX_LENGTH), str(tasks), str(out)],
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    samples = {(s["doc"]["context"], s["doc"]["continuation"]): s["resps"][0][0] for s in json.loads(out.read_text())}
    loaded = load_model_dir(model_dir)
    for context, continuation in DOCS:
        loglikelihood, _greedy = samples[(context, continuation)]
        text = context + continuation
        context = text[-(MAX_LENGTH - 1):][: -len(continuation)]  # what lm-eval sends: the last max_length - 1
        expected = -(evaluate_nats(loaded, context + continuation, tmp_path) - evaluate_nats(loaded, context, tmp_path))
        assert float(loglikelihood) == pytest.approx(expected, rel=1e-4, abs=1e-4), (context, continuation)
