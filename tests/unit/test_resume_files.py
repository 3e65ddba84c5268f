"""What a new training does with the checkpoints it finds (``training.resume``): an unfinished run
of the same configuration is resumed, an unfinished one of another is kept aside (never
overwritten), a finished one is replaced. Files only: no training here (tests/integration/test_resume.py
does it with real Ctrl-C)."""

from __future__ import annotations

import json

import torch

from lmforge.training.resume import NOTE_FILE, find_resume_point, mark_finished, start_afresh


def checkpoints(tmp_path, step: int = 37, **record):
    folder = tmp_path / "models" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save({"global_step": step, "state_dict": {"w": torch.ones(3)}}, folder / "last.ckpt")
    torch.save({"global_step": 20}, folder / "best.ckpt")
    (folder / ".last.ckpt.tmp-abc").write_bytes(b"half")  # a save cut short
    run = {"run_id": "0123456789abcdef", "run_name": "crimson-fern", "fingerprint": "A", **record}
    (folder / "run.json").write_text(json.dumps(run))
    return folder


def test_an_unfinished_run_of_the_same_configuration_is_resumed(tmp_path):
    folder = checkpoints(tmp_path)
    expected = (folder / "last.ckpt", json.loads((folder / "run.json").read_text()))
    assert find_resume_point(folder, "auto", "A") == expected
    assert find_resume_point(folder, "auto", "B") == (None, None)
    assert find_resume_point(folder, "never", "A") == (None, None)
    mark_finished(folder)
    assert find_resume_point(folder, "auto", "A") == (None, None)  # finished: a rerun trains afresh


def test_an_unfinished_run_of_another_configuration_is_kept_aside_with_a_note(tmp_path, capsys):
    folder = checkpoints(tmp_path)
    saved = (folder / "last.ckpt").read_bytes()
    backup = start_afresh(folder, "auto", "B")
    assert backup == tmp_path / "models" / "checkpoints.crimson-fern-01234567-step37"
    assert (backup / "last.ckpt").read_bytes() == saved and (backup / "best.ckpt").is_file()
    assert json.loads((backup / "run.json").read_text())["run_id"] == "0123456789abcdef"
    assert list(folder.iterdir()) == []  # room for the new run; the cut-short save is gone
    note = (backup / NOTE_FILE).read_text()
    assert note.count("\n") == 1 and "a run of another configuration; last saved at step 37" in note
    assert capsys.readouterr().out == f"train: {note}"
    # The next one gets its own name: nothing is ever overwritten.
    checkpoints(tmp_path / "again")
    (tmp_path / "again" / "models" / "checkpoints.crimson-fern-01234567-step37").mkdir()
    second = start_afresh(tmp_path / "again" / "models" / "checkpoints", "never", "A")
    assert second.name == "checkpoints.crimson-fern-01234567-step37-2"
    assert "train.resume=never" in (second / NOTE_FILE).read_text()


def test_a_finished_run_is_replaced_and_files_not_ours_stay(tmp_path, capsys):
    folder = checkpoints(tmp_path)
    (folder / "notes.md").write_text("mine")
    mark_finished(folder)
    assert start_afresh(folder, "auto", "B") is None
    assert [p.name for p in folder.iterdir()] == ["notes.md"]
    assert not list((tmp_path / "models").glob("checkpoints.*")) and capsys.readouterr().out == ""


def test_checkpoints_without_a_run_file_are_kept_too(tmp_path):
    folder = checkpoints(tmp_path)
    (folder / "run.json").unlink()
    backup = start_afresh(folder, "auto", "A")
    assert backup.name == "checkpoints.run-step37" and "no run.json names its run" in (backup / NOTE_FILE).read_text()
