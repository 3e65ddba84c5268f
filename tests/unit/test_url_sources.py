"""data.sources as URLs through fsspec: read like local files, and one sentence when a filesystem is missing."""

from __future__ import annotations

import hashlib
from pathlib import Path

import fsspec
import pytest

from lmforge.config.compose import compose_config
from lmforge.corpus.sources import resolve_sources
from lmforge.corpus.stage import prepare_stage
from lmforge.errors import LmforgeError
from tests.helpers import ROOT, write_mixed_corpus


def _cfg(workdir: Path, sources: list[str]):
    cfg = compose_config(["data.split=document", "data.val_fraction=0.3"], conf_dir=ROOT / "conf")
    for key in ("prepared", "reports"):
        cfg.paths[key] = str(workdir / key)
    cfg.data.sources = sources
    return cfg


def test_a_corpus_behind_an_fsspec_url_prepares_to_the_same_bytes(tmp_path):
    corpus = write_mixed_corpus(tmp_path / "corpus")
    memory = fsspec.filesystem("memory")
    root = f"/lmforge-test-{tmp_path.name}"
    try:
        for path in sorted(corpus.iterdir()):
            memory.pipe(f"{root}/docs/{path.name}", path.read_bytes())
        memory.pipe(f"{root}/docs/.hidden.txt", b"never read")
        files = resolve_sources([f"memory://{root}/docs"])
        assert [str(f) for f in files] == [f"memory://{root}/docs/{p.name}" for p in sorted(corpus.iterdir())]
        assert [f.name for f in resolve_sources([f"memory://{root}/docs/*.jsonl*"])] == [
            "c_web_0.jsonl", "c_web_1.jsonl.gz", "c_web_2.jsonl"]
        prepare_stage(_cfg(tmp_path / "local", [str(corpus)]))
        prepare_stage(_cfg(tmp_path / "url", [f"memory://{root}/docs"]))
    finally:
        memory.rm(root, recursive=True)
    for name in ("prepared/train.txt", "prepared/val.txt", "reports/prepare.json"):
        assert (hashlib.sha256((tmp_path / "url" / name).read_bytes()).digest()
                == hashlib.sha256((tmp_path / "local" / name).read_bytes()).digest()), name


def test_a_file_url_is_a_plain_path(tmp_path):
    (tmp_path / "a.txt").write_text("text")
    assert resolve_sources([f"file://{tmp_path}/*.txt"]) == [tmp_path / "a.txt"]


def test_a_missing_filesystem_package_is_one_sentence_naming_it():
    with pytest.raises(LmforgeError) as err:
        resolve_sources(["gs://bucket/corpus/*.jsonl"])
    assert str(err.value) == ("data.sources entry 'gs://bucket/corpus/*.jsonl' needs the gs:// filesystem package "
                              "'gcsfs', which is not installed; pip install gcsfs.")


@pytest.mark.parametrize("entry, says", [("nosuch://x/y.txt", "Protocol not known"),
                                         ("memory://lmforge-absent/y.txt", "does not exist")])
def test_an_unknown_scheme_or_a_missing_url_is_one_sentence(entry, says):
    with pytest.raises(LmforgeError, match=says):
        resolve_sources([entry])
