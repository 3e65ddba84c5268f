"""Outputs are checked before a stage works and written all or nothing; a refused write is one sentence.

The failures here are real ones that stop root too (a path whose parent is a regular file), except
where a rename must fail after another succeeded, which only a patched ``os.replace`` can arrange.
"""

from __future__ import annotations

import os

import pytest

from lmforge import outputs
from lmforge.errors import LmforgeError
from lmforge.outputs import atomic_path, check_writable, write_json


def listing(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_check_writable_passes_a_new_nested_output_and_leaves_nothing_behind(tmp_path):
    (tmp_path / "reports").mkdir()
    check_writable(("paths.prepared", tmp_path / "data/new/prepared"), ("paths.reports", tmp_path / "reports/x.json"))
    assert listing(tmp_path) == ["reports"]  # no probe left, no folder made


def test_check_writable_names_the_output_the_folder_and_the_key(tmp_path):
    (tmp_path / "data").write_text("a file where a folder should be")
    with pytest.raises(LmforgeError) as err:
        check_writable(("paths.reports", tmp_path / "reports/r.json"), ("paths.tokens", tmp_path / "data/tokens"))
    assert str(err.value) == (f"cannot write {tmp_path / 'data/tokens'}: {tmp_path / 'data'} is a file, not a folder; "
                              f"make {tmp_path / 'data'} a folder you can write, or set paths.tokens to one, "
                              "and rerun (nothing was written).")


def test_a_refused_temporary_is_one_sentence(tmp_path):
    (tmp_path / "data").write_text("a file")
    with pytest.raises(LmforgeError) as err:
        with atomic_path(tmp_path / "data/prepared", directory=True):
            raise AssertionError("never reached")
    assert str(err.value) == (f"cannot write {tmp_path / 'data/prepared'}: {tmp_path / 'data'} is a file, not a "
                              f"folder; make {tmp_path / 'data'} a folder you can write, with space free, and rerun "
                              "(nothing was replaced).")
    with pytest.raises(LmforgeError, match=r"^cannot write .*data/x\.json: .*data is a file, not a folder; "):
        write_json(tmp_path / "data/x.json", {})


def test_a_write_refused_mid_way_is_one_sentence_and_the_old_output_stays(tmp_path):
    out = tmp_path / "tokens"
    out.mkdir()
    (out / "index.json").write_text("the previous output")
    with pytest.raises(LmforgeError, match=r"^cannot write .*/tokens: .*/tokens/train is a file, not a folder") as err:
        with atomic_path(out, directory=True) as tmp:
            (tmp / "train").write_text("a file where the shards' folder goes")
            open(tmp / "train" / "shard_000000.bin", "wb")  # refused by the system, as a full disk would be
    assert err.value.__cause__ is None and err.value.__suppress_context__
    assert listing(tmp_path) == ["tokens", "tokens/index.json"]
    assert (out / "index.json").read_text() == "the previous output"


def test_an_unreadable_input_is_not_reported_as_a_write(tmp_path):
    with pytest.raises(FileNotFoundError):
        with atomic_path(tmp_path / "out.txt") as tmp:
            tmp.write_text((tmp_path / "missing-input.txt").read_text())
    assert listing(tmp_path) == []


def test_a_directory_whose_last_rename_fails_is_put_back(tmp_path, monkeypatch):
    out = tmp_path / "prepared"
    out.mkdir()
    (out / "train.txt").write_text("the previous output")
    replace = os.replace

    def refuse_the_new_one(src, dst):
        if ".tmp-" in str(src):
            raise PermissionError(1, "Operation not permitted", str(src), None, str(dst))
        replace(src, dst)

    monkeypatch.setattr(outputs.os, "replace", refuse_the_new_one)
    with pytest.raises(LmforgeError, match=r"^cannot write (.*/prepared): Operation not permitted \(\1\); "):
        with atomic_path(out, directory=True) as tmp:
            (tmp / "train.txt").write_text("the new output")
    assert listing(tmp_path) == ["prepared", "prepared/train.txt"]
    assert (out / "train.txt").read_text() == "the previous output"
