"""The base model of a fine-tune (lmforge.tokenization.base, lmforge.interop.base): local lmforge and transformers
directories, Hub ids resolved from a cache built here in the Hub's own layout (no network), and
every way a careless user names a base that is not there."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from lmforge.errors import LmforgeError
from lmforge.interop.base import load_base
from lmforge.tokenization.base import (
    HUB,
    LMFORGE,
    LOCAL,
    TRANSFORMERS,
    adopt_tokenizer,
    check_same,
    read_record,
    resolve_base,
    resolve_recorded,
)
from tests.helpers import make_model_dir

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hf_dir(tmp_path: Path) -> Path:
    """A tiny transformers (GPT-2) directory, exported by lmforge from a random model directory."""
    from lmforge.interop.hf import export_hf

    return export_hf(make_model_dir(tmp_path / "lm"), tmp_path / "hf")


def hub_cache(tmp_path: Path, source: Path, repo: str = "org/tiny", commit: str = COMMIT,
              refs: dict[str, str] | None = None) -> Path:
    """``source``'s files in the Hub's cache layout: models--org--name/{blobs,refs,snapshots}."""
    cache = tmp_path / "hub"
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in sorted(source.iterdir()):
        data = file.read_bytes()
        blob = hashlib.sha256(data).hexdigest() if file.suffix == ".safetensors" else hashlib.sha1(data).hexdigest()
        (root / "blobs" / blob).write_bytes(data)
        (snapshot / file.name).symlink_to(Path("..") / ".." / "blobs" / blob)
    for name, sha in (refs or {"main": commit}).items():
        (root / "refs" / name).write_text(sha)
    return cache


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HOME", raising=False)
    cache = hub_cache(tmp_path, hf_dir(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_lmforge_model_directory(tmp_path):
    directory = make_model_dir(tmp_path / "model")
    base = resolve_base(str(directory))
    assert (base.kind, base.source, base.revision, base.path) == (LMFORGE, LOCAL, None, directory)
    assert base.files == {name: sha256(directory / name) for name in ("config.json", "model.safetensors",
                                                                       "tokenizer.json")}
    loaded = load_base(base)
    assert loaded.eot_token == "<|endoftext|>" and loaded.model.config.n_layer == 2


def test_a_transformers_directory(tmp_path):
    directory = hf_dir(tmp_path)
    base = resolve_base(directory)
    assert (base.kind, base.source) == (TRANSFORMERS, LOCAL)
    assert set(base.files) >= {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert base.files["model.safetensors"] == sha256(directory / "model.safetensors")
    assert load_base(base).model.config.n_embd == 32


def test_a_hub_id_from_the_cache_at_main(tmp_path, offline_hub):
    base = resolve_base("org/tiny")
    assert (base.kind, base.source, base.revision) == (TRANSFORMERS, HUB, COMMIT)
    assert base.path.parent.parent.name == "models--org--tiny"
    for name, digest in base.files.items():  # large files: the blob's name; small ones: read
        assert digest == sha256(base.path / name), name
    assert base.tags()["lmforge.base.revision"] == COMMIT
    assert load_base(base).model.config.n_layer == 2


def test_a_hub_id_at_a_commit_or_a_named_ref(tmp_path, monkeypatch):
    other = "f" * 40
    cache = hub_cache(tmp_path, hf_dir(tmp_path), refs={"main": COMMIT, "v1": other})
    (cache / "models--org--tiny" / "snapshots" / other).symlink_to(COMMIT)  # same files, another commit
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_base("org/tiny", COMMIT).revision == COMMIT
    assert resolve_base("org/tiny", "v1").revision == other


def test_offline_and_not_cached_is_one_sentence(offline_hub):
    with pytest.raises(LmforgeError) as err:
        resolve_base("org/absent")
    message = str(err.value)
    assert "\n" not in message and "org/absent" in message and "HF_HUB_OFFLINE" in message
    assert "hf download org/absent" in message


def test_a_revision_not_in_the_cache_is_one_sentence(offline_hub):
    with pytest.raises(LmforgeError, match="org/tiny at revision v9 is not in the Hub cache") as err:
        resolve_base("org/tiny", "v9")
    assert "\n" not in str(err.value)


def test_a_revision_for_a_local_directory_is_refused(tmp_path):
    with pytest.raises(LmforgeError, match="finetune.revision=v1 applies only to Hub ids"):
        resolve_base(make_model_dir(tmp_path / "model"), "v1")


@pytest.mark.parametrize("name", ["./missing", "models/missing/deeper", "/no/such/dir", "not a name", " "])
def test_a_missing_base_is_named(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LmforgeError, match="does not exist|is empty") as err:
        resolve_base(name)
    assert "\n" not in str(err.value)


def test_a_file_or_a_directory_that_is_no_model(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(LmforgeError, match="is a file, not a directory"):
        resolve_base(tmp_path / "file.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmforgeError, match="has no config.json"):
        resolve_base(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{not json")
    with pytest.raises(LmforgeError, match="is not valid JSON"):
        resolve_base(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"hidden": 3}))
    with pytest.raises(LmforgeError, match="names no model_type"):
        resolve_base(tmp_path / "empty")


def test_a_transformers_directory_with_pickled_weights_only(tmp_path):
    directory = hf_dir(tmp_path)
    (directory / "model.safetensors").rename(directory / "pytorch_model.bin")
    with pytest.raises(LmforgeError, match="only pickled .bin weights"):
        load_base(resolve_base(directory))


def test_adopting_the_tokenizer_records_the_base(tmp_path, offline_hub):
    base = resolve_base("org/tiny")
    vocab = tmp_path / "vocab"
    adopt_tokenizer(base, vocab)
    assert (vocab / "tokenizer.json").read_bytes() == (base.path / "tokenizer.json").read_bytes()
    assert (vocab / "tokenizer_config.json").is_file()
    record = read_record(vocab)
    assert record["revision"] == COMMIT and record["eot_token"] == "<|endoftext|>" and record["files"] == base.files
    again, _ = resolve_recorded(vocab)  # what train and evaluate do: the same commit, verified
    assert again.path == base.path


def test_a_base_that_changed_after_the_vocab_stage_is_refused(tmp_path):
    directory = make_model_dir(tmp_path / "model")
    adopt_tokenizer(resolve_base(directory), tmp_path / "vocab")
    make_model_dir(tmp_path / "other", seed=1)
    os.replace(tmp_path / "other" / "model.safetensors", directory / "model.safetensors")
    with pytest.raises(LmforgeError, match="files that have changed since .*rerun the pipeline from the vocab stage"):
        resolve_recorded(tmp_path / "vocab")
    with pytest.raises(LmforgeError, match="has another base"):
        check_same(resolve_base(tmp_path / "other"), read_record(tmp_path / "vocab"), tmp_path / "vocab")


def test_check_reads_a_cached_hub_bases_architecture(offline_hub):
    # `lmforge check` names what it will train: the cached base's size, or that it is not fetched yet.
    from lmforge.config.compose import compose_config
    from lmforge.stages.check import summary
    from tests.helpers import ROOT

    cached = summary(compose_config(["experiment=finetune", "finetune.base=org/tiny"], conf_dir=ROOT / "conf"))
    assert cached["vocab_source"] == "the architecture of finetune.base=org/tiny"
    assert cached["parameters"] == load_base(resolve_base("org/tiny")).model.num_params()
    absent = summary(compose_config(["experiment=finetune", "finetune.base=org/absent"], conf_dir=ROOT / "conf"))
    assert "finetune.base=org/absent is not fetched yet" in absent["vocab_source"]
