"""`lmforge evaluate --model DIR --data FILE...`: the metrics of a model on any text, computed by
the evaluate stage's code, printed, written and logged to MLflow; and `lmforge evaluate k=v`
still runs the stage."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.evaluation.text import evaluate_text
from lmforge.model.directory import load_model_dir
from tests.helpers import CHAR_TEXT, make_model_dir, run_cli, write_corpus

# Tiny tensors: one thread is fastest on a shared 2-core machine (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def project(tmp_path, monkeypatch, project_root):
    """Run in a project directory: its params.yaml says how text is read (model dirs made here have none)."""
    from lmforge.config.compose import compose_config, write_params

    write_params(compose_config(conf_dir=project_root / "conf"), tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def text_files(tmp_path):
    folder = tmp_path / "text"
    folder.mkdir()
    (folder / "a.txt").write_text(CHAR_TEXT * 3, encoding="utf-8")
    (folder / "b.txt").write_text("Good night, fair queen!\n" * 5, encoding="utf-8")
    return folder


def test_evaluate_text_equals_the_evaluate_stage_on_the_validation_split(tiny_cfg, tmp_path):
    from lmforge.corpus.stage import prepare_stage
    from lmforge.evaluation.stage import evaluate_stage
    from lmforge.model.directory import save_model_dir
    from lmforge.model.gpt import GPT, GPTConfig
    from lmforge.tokenization.encode import tokenize_stage
    from lmforge.tokenization.shards import read_index
    from lmforge.tokenization.vocab import vocab_stage

    tiny_cfg.data.sources = [str(write_corpus(tmp_path / "corpus", n_docs=6, words=200))]
    tiny_cfg.evaluate.max_batches = None
    prepare_stage(tiny_cfg)
    vocab_stage(tiny_cfg)
    index = tokenize_stage(tiny_cfg)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=index["vocab_size"], block_size=32, n_layer=1, n_head=2, n_embd=16))
    meta = {"kind": "char", "eot_token": tiny_cfg.tokenizer.eot_token, "eot_id": index["eot_id"]}
    save_model_dir(tiny_cfg.paths.model, model, f"{tiny_cfg.paths.vocab}/tokenizer.json", meta, train_cfg=tiny_cfg)

    stage = evaluate_stage(tiny_cfg)
    text = evaluate_text(load_model_dir(tiny_cfg.paths.model), [f"{tiny_cfg.paths.prepared}/val.txt"])
    assert text["tokens"] == stage["val_tokens"] == read_index(tiny_cfg.paths.tokens)["splits"]["val"]["tokens"]
    assert text["bytes"] == stage["val_bytes"]
    assert text["loss"] == pytest.approx(stage["val_loss"], rel=1e-6)
    assert text["bits_per_byte"] == pytest.approx(stage["val_bits_per_byte"], rel=1e-6)


def test_metrics_of_several_files(tmp_path, text_files):
    loaded = load_model_dir(make_model_dir(tmp_path / "model"))
    metrics = evaluate_text(loaded, [str(text_files)])
    texts = [(text_files / name).read_text() for name in ("a.txt", "b.txt")]
    ids = [loaded.tokenizer.encode(t, add_special_tokens=False).ids for t in texts]
    assert metrics["files"] == 2 and metrics["documents"] == 2 and metrics["unknown_tokens"] == 0
    assert metrics["tokens"] == len(ids[0]) + 1 + len(ids[1])  # documents joined by end-of-text
    assert metrics["bytes"] == sum(len(t.encode()) for t in texts)
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
    nats = metrics["loss"] * (metrics["tokens"] - 1)
    assert metrics["bits_per_byte"] == pytest.approx(nats / math.log(2) / metrics["bytes"])
    # A random model is about as good as uniform over the vocabulary.
    assert abs(metrics["loss"] - math.log(loaded.model.config.vocab_size)) < 0.5


def test_evaluate_command_prints_and_writes_the_metrics(tmp_path, text_files, capsys):
    model_dir = make_model_dir(tmp_path / "model")
    out = tmp_path / "metrics.json"
    code, stdout, err = run_cli(["evaluate", "--model", model_dir, "--data", text_files / "a.txt",
                                 text_files / "b.txt", "--out", out], capsys)
    assert code == 0, err
    written = json.loads(out.read_text())
    expected = evaluate_text(load_model_dir(model_dir), [str(text_files / "a.txt"), str(text_files / "b.txt")])
    assert written["loss"] == pytest.approx(expected["loss"]) and written["tokens"] == expected["tokens"]
    for key in ("loss", "perplexity", "bits_per_byte", "tokens", "bytes"):
        assert f"  {key}" in stdout
    assert f"{expected['loss']:.4f}" in stdout


def test_unknown_characters_are_counted_and_warned_about(tmp_path, capsys):
    model_dir = make_model_dir(tmp_path / "model")
    (tmp_path / "x.txt").write_text("the caf\u00e9 \u2603 of the king\n", encoding="utf-8")
    code, stdout, err = run_cli(["evaluate", "--model", model_dir, "--data", tmp_path / "x.txt"], capsys)
    assert code == 0
    assert "unknown_tokens  3" in stdout  # c, é and the snowman
    assert "warning: 3 tokens are <unk>" in err


def test_evaluate_command_errors_are_one_line(tmp_path, capsys):
    model_dir = make_model_dir(tmp_path / "model")
    code, _, err = run_cli(["evaluate", "--model", model_dir, "--data", tmp_path / "nope.txt"], capsys)
    assert code == 1 and err.count("\n") == 1 and "nope.txt' does not exist" in err
    (tmp_path / "one.txt").write_text("t", encoding="utf-8")
    code, _, err = run_cli(["evaluate", "--model", model_dir, "--data", tmp_path / "one.txt"], capsys)
    assert code == 1 and "holds fewer than 2 tokens of text" in err
    code, _, err = run_cli(["evaluate", "--model", tmp_path / "missing", "--data", tmp_path / "one.txt"], capsys)
    assert code == 1 and err.startswith(f"error: model directory {tmp_path / 'missing'} does not exist")
    with pytest.raises(LmforgeError):
        evaluate_text(load_model_dir(model_dir), [str(tmp_path / "one.txt")])


def test_mlflow_logging_onto_the_training_run_or_a_new_one(tmp_path, text_files, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    from lmforge.model.directory import write_run_info
    from lmforge.tracking import runs as tracking

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    experiment_id = tracking.ensure_experiment(uri, "lmforge-test")
    client = MlflowClient(tracking_uri=uri)
    trained = make_model_dir(tmp_path / "trained")
    run_id = client.create_run(experiment_id).info.run_id
    write_run_info(trained, {"tracking_uri": uri, "experiment_id": experiment_id, "run_id": run_id})

    code, stdout, err = run_cli(["evaluate", "--model", trained, "--data", text_files / "a.txt", "--mlflow"], capsys)
    assert code == 0, err
    metrics = client.get_run(run_id).data.metrics
    assert {"eval/a/loss", "eval/a/perplexity", "eval/a/bits_per_byte", "eval/a/tokens"} <= set(metrics)

    untracked = make_model_dir(tmp_path / "untracked")
    code, stdout, err = run_cli(["evaluate", "--model", untracked, "--data", text_files, "--mlflow",
                                 "--name", "my texts", "--tracking-uri", uri, "--experiment", "lmforge-test"], capsys)
    assert code == 0, err
    runs = client.search_runs([experiment_id], filter_string="attributes.run_name = 'evaluate-untracked'")
    assert len(runs) == 1 and "eval/my_texts/bits_per_byte" in runs[0].data.metrics
    # Without --experiment: the project's tracking.experiment (params.yaml).
    code, stdout, err = run_cli(["evaluate", "--model", untracked, "--data", text_files, "--mlflow",
                                 "--tracking-uri", uri], capsys)
    assert code == 0, err
    experiment = client.get_experiment_by_name("lmforge")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and "eval/text/loss" in runs[0].data.metrics


def test_evaluate_with_overrides_still_runs_the_stage(tiny_cfg, tmp_path, capsys, monkeypatch):
    from lmforge.config.compose import write_params

    monkeypatch.setattr("lmforge.stages.runner.stage_function",
                        lambda name: lambda cfg: {"stage": name, "n": cfg.evaluate.max_new_tokens})
    write_params(tiny_cfg, tmp_path / "params.yaml")
    code, stdout, err = run_cli(["evaluate", "evaluate.max_new_tokens=7"], capsys)
    assert code == 0, err
    assert "stage=evaluate" in stdout and "n=7" in stdout


def test_jsonl_and_compressed_files_read_as_the_corpus_is(tmp_path, text_files):
    import gzip

    loaded = load_model_dir(make_model_dir(tmp_path / "model"))
    docs = ["the king\r\nspeaks", "good night"]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    with gzip.open(tmp_path / "plain.txt.gz", "wt", encoding="utf-8") as f:
        f.write(CHAR_TEXT)
    metrics = evaluate_text(loaded, [str(tmp_path / "docs.jsonl"), str(tmp_path / "plain.txt.gz")])
    cleaned = ["the king\nspeaks", "good night", CHAR_TEXT]  # CRLF becomes LF, as in the prepare stage
    assert metrics["documents"] == 3 and metrics["bytes"] == sum(len(d.encode()) for d in cleaned)
    ids = [loaded.tokenizer.encode(d, add_special_tokens=False).ids for d in cleaned]
    assert metrics["tokens"] == sum(map(len, ids)) + 2


def test_a_model_without_train_config_reads_plain_utf8_without_params_yaml(tmp_path, text_files, monkeypatch, capsys):
    # README: "UTF-8 text for a model without one" (an imported model has no train_config.yaml).
    model_dir = make_model_dir(tmp_path / "model")
    assert not (model_dir / "train_config.yaml").exists()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # no params.yaml here
    code, out, err = run_cli(["evaluate", "--model", model_dir, "--data", text_files], capsys)
    assert code == 0, err
    assert "2 file(s), 2 document(s)" in out


def test_bits_per_byte_say_they_count_the_bytes_after_crlf_becomes_lf(tmp_path, capsys):
    model_dir = make_model_dir(tmp_path / "model")
    raw = b"\xef\xbb\xbf" + CHAR_TEXT.replace("\n", "\r\n").encode("utf-8")  # a Windows editor's file
    (tmp_path / "crlf.txt").write_bytes(raw)
    out = tmp_path / "metrics.json"
    code, stdout, err = run_cli(["evaluate", "--model", model_dir, "--data", tmp_path / "crlf.txt", "--out", out],
                                capsys)
    assert code == 0, err
    metrics = json.loads(out.read_text())
    assert metrics["bytes"] == len(CHAR_TEXT.encode()) < metrics["bytes_before_cleaning"] == len(raw) - 3
    assert metrics["file_bytes"] == len(raw)
    nats = metrics["loss"] * (metrics["tokens"] - 1)
    assert metrics["bits_per_byte"] == pytest.approx(nats / math.log(2) / metrics["bytes"])  # the cleaned bytes
    assert "bits_per_byte" in stdout and "(per byte of the text after cleaning)" in stdout
    bytes_line = next(line for line in stdout.splitlines() if line.strip().startswith("bytes"))
    assert f"{metrics['bytes']:,} after cleaning (CRLF -> LF" in bytes_line
    assert f"{len(raw) - 3:,} before; the files hold {len(raw):,}" in bytes_line


def test_a_missing_data_folder_names_the_data_option_not_data_sources(tmp_path, capsys):
    model_dir = make_model_dir(tmp_path / "model")
    for entry in ("my_texts/", "my_texts/*.txt"):
        code, _, err = run_cli(["evaluate", "--model", model_dir, "--data", entry], capsys)
        assert code == 1 and err.count("\n") == 1, err
        assert "--data" in err and "data.sources" not in err, err


def test_max_batches_prints_the_tokens_scored_and_the_total(tmp_path, capsys):
    model_dir = make_model_dir(tmp_path / "model")  # context 16: one batch of 2 windows scores 32 tokens
    (tmp_path / "long.txt").write_text(CHAR_TEXT * 20, encoding="utf-8")
    code, stdout, err = run_cli(["evaluate", "--model", model_dir, "--data", tmp_path / "long.txt",
                                 "--max-batches", "1", "--batch-size", "2"], capsys)
    assert code == 0, err
    total = len(CHAR_TEXT) * 20
    assert f"tokens          32 scored of {total:,} (--max-batches)" in stdout
    code, stdout, err = run_cli(["evaluate", "--model", model_dir, "--data", tmp_path / "long.txt"], capsys)
    assert f"tokens          {total:,} (all scored)" in stdout


def test_the_stage_samples_from_the_validation_text_without_prompts_and_says_which_bytes_it_counts(tiny_cfg, tmp_path):
    from lmforge.corpus.stage import prepare_stage
    from lmforge.evaluation.prompts import prompts_from_text
    from lmforge.evaluation.report import BYTES_NOTE
    from lmforge.evaluation.stage import evaluate_stage
    from lmforge.model.directory import save_model_dir
    from lmforge.model.gpt import GPT, GPTConfig
    from lmforge.tokenization.encode import tokenize_stage
    from lmforge.tokenization.vocab import vocab_stage

    tiny_cfg.data.sources = [str(write_corpus(tmp_path / "corpus", n_docs=6, words=200))]
    tiny_cfg.data.prompts = None  # a corpus whose data config brings no prompts
    prepare_stage(tiny_cfg)
    vocab_stage(tiny_cfg)
    index = tokenize_stage(tiny_cfg)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=index["vocab_size"], block_size=32, n_layer=1, n_head=2, n_embd=16))
    meta = {"kind": "char", "eot_token": tiny_cfg.tokenizer.eot_token, "eot_id": index["eot_id"]}
    save_model_dir(tiny_cfg.paths.model, model, f"{tiny_cfg.paths.vocab}/tokenizer.json", meta, train_cfg=tiny_cfg)

    metrics = evaluate_stage(tiny_cfg)
    val = (tmp_path / tiny_cfg.paths.prepared / "val.txt").read_text(encoding="utf-8")
    prompts = prompts_from_text(val, cut_mid_text=True)  # the default split is by position
    assert len(prompts) == 3 and all(p in val and "**" not in p for p in prompts)
    samples = (tmp_path / tiny_cfg.paths.reports / "samples.md").read_text()
    assert [line.split(": ", 1)[1] for line in samples.splitlines() if line.startswith("## Prompt")] == \
        [f"`{p!r}`" for p in prompts]
    assert metrics["val_tokens_scored"] <= metrics["val_tokens"]  # evaluate.max_batches=2 in tiny_cfg
    report = (tmp_path / tiny_cfg.paths.reports / "report.md").read_text()
    assert BYTES_NOTE in report and "validation bytes (UTF-8, after cleaning)" in report
