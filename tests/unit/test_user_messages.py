"""What a careless user reads (issue 20 item 10): the skip warning, a vocabulary smaller than asked,
a model URI looked up where there is no store, MLflow's progress bars in a log file."""

from __future__ import annotations

import json
import re

import pytest

from lmforge.corpus.reading import skipped
from lmforge.errors import LmforgeError
from tests.helpers import ROOT

# --- The skip warning does not advise setting what is set ---


def every_skip_advice() -> list[str]:
    """The sentences of corpus/reading.py that end in advice to set data.skip_bad_files=true."""
    source = (ROOT / "src/lmforge/corpus/reading.py").read_text()
    return re.findall(r'"([^"\n]*data\.skip_bad_files=true to skip[^"\n]*)"', source)


def test_every_advice_to_skip_is_found():
    assert len(every_skip_advice()) >= 6


@pytest.mark.parametrize("advice", every_skip_advice())
def test_the_skip_warning_drops_the_advice_to_skip(advice):
    sentence = f"corpus/a.txt is not valid UTF-8 at byte offset 3; fix it, {advice}"
    warning = skipped(sentence)
    assert "skip_bad_files" not in warning
    assert warning.startswith("corpus/a.txt is not valid UTF-8 at byte offset 3") and warning.endswith(".")


def test_a_skipped_file_warns_without_the_advice(tmp_path, capsys):
    from omegaconf import OmegaConf

    from lmforge.config.compose import compose_config
    from lmforge.corpus.stage import prepare_stage

    (tmp_path / "good.txt").write_text("some text that is fine\n" * 20)
    (tmp_path / "bad.txt").write_bytes(b"text \xff\xfe more\n")
    cfg = compose_config(conf_dir=ROOT / "conf")
    OmegaConf.update(cfg, "data.sources", [str(tmp_path / "good.txt"), str(tmp_path / "bad.txt")], merge=False)
    cfg.data.skip_bad_files = True
    cfg.paths.prepared, cfg.paths.reports = str(tmp_path / "prepared"), str(tmp_path / "reports")
    prepare_stage(cfg)
    warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: skipped")]
    assert len(warning) == 1 and "bad.txt" in warning[0]
    assert "skip_bad_files" not in warning[0] and "data.decode_errors=replace" in warning[0]


# --- A BPE vocabulary smaller than tokenizer.vocab_size is said so ---


def run_vocab_stage(tmp_path, text: str, overrides: list[str]) -> dict:
    from lmforge.config.compose import compose_config
    from lmforge.tokenization.vocab import vocab_stage

    cfg = compose_config(overrides, conf_dir=ROOT / "conf")
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / "train.txt").write_text(text)
    (prepared / "val.txt").write_text(text[:40])
    cfg.paths.prepared, cfg.paths.vocab, cfg.paths.reports = str(prepared), str(tmp_path / "vocab"), str(tmp_path / "r")
    return vocab_stage(cfg)


def test_a_bpe_vocabulary_smaller_than_asked_is_in_the_report_and_the_log(tmp_path, capsys):
    text = "the quick brown fox jumps over the lazy dog, again and again. " * 50  # 29 distinct characters
    metrics = run_vocab_stage(tmp_path, text, ["tokenizer=bpe", "tokenizer.vocab_size=50000"])
    report = json.loads((tmp_path / "r/vocab.json").read_text())
    assert report["requested_vocab_size"] == 50000 and report["vocab_size"] == metrics["vocab_size"] < 50000
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"vocab: bpe, {report['vocab_size']:,} tokens")
    assert "fewer than the 50,000 tokenizer.vocab_size asked for" in line


def test_a_vocabulary_of_the_size_asked_says_nothing_more(tmp_path, capsys):
    text = "the quick brown fox jumps over the lazy dog, again and again. " * 50
    run_vocab_stage(tmp_path, text, ["tokenizer=bpe", "tokenizer.vocab_size=260"])
    report = json.loads((tmp_path / "r/vocab.json").read_text())
    assert report["requested_vocab_size"] == report["vocab_size"] == 260
    assert "fewer" not in capsys.readouterr().out
    (tmp_path / "c").mkdir()
    run_vocab_stage(tmp_path / "c", text, [])  # tokenizer=char: null asks for the alphabet
    assert json.loads((tmp_path / "c/r/vocab.json").read_text())["requested_vocab_size"] is None


# --- A model URI on a store that does not exist ---


def test_a_model_uri_on_a_missing_sqlite_store_is_one_sentence_and_creates_no_store(tmp_path, monkeypatch):
    from lmforge.model.directory import fetch_model_dir

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())  # its store: sqlite:///mlflow.db
    with pytest.raises(LmforgeError, match=r"there is no MLflow store at sqlite:///\S+/mlflow.db to look "
                                           r"models:/nope/1 up in; pass --tracking-uri"):
        fetch_model_dir("models:/nope/1")
    with pytest.raises(LmforgeError, match="no MLflow store"):
        fetch_model_dir("runs:/0123/model", f"sqlite:///{tmp_path}/elsewhere.db")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


# --- MLflow's download progress bars ---


@pytest.mark.parametrize("terminal", [False, True])
def test_progress_bars_are_off_unless_stderr_is_a_terminal(monkeypatch, terminal):
    import io
    import os

    from lmforge.tracking.runs import quiet_mlflow_env

    class Stderr(io.StringIO):
        def isatty(self):
            return terminal

    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)
    monkeypatch.setattr("sys.stderr", Stderr())
    quiet_mlflow_env()
    assert os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR") == (None if terminal else "false")
    from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR

    assert MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.get() is terminal  # the variable MLflow reads
