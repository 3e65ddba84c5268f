"""`dvc repro` of a chat fine-tuning pipeline (data.format=chat) in a copy of the project: every
stage's declared outputs are written (reports/tokenize.json among them), the model carries its chat
template, and a second `dvc status` finds nothing to do."""

from __future__ import annotations

import json

import pytest

from tests.helpers import TINY_PIPELINE, commit_all, copy_project, run_command
from tests.integration.test_chat import write_chat_data


@pytest.mark.slow
def test_dvc_repro_runs_a_chat_pipeline_and_is_then_up_to_date(tmp_path):
    overrides = [*TINY_PIPELINE, "model.block_size=128", "data.format=chat", "data.dedupe=false",
                 "data.sources=[chat.jsonl]", "data.skip_bad_records=true",
                 "evaluate.chat_prompts=[What is the color of the sky?]"]
    project = copy_project(tmp_path / "project", overrides)
    write_chat_data(project / "chat.jsonl")
    commit_all(project, "chat data")
    run_command(["dvc", "repro"], project)
    tokenize = json.loads((project / "reports" / "tokenize.json").read_text())
    assert tokenize["format"] == "chat" and tokenize["train_loss_tokens"] > 0
    assert (project / "models" / "gpt" / "chat_template.jinja").is_file()
    assert "assistant: " in (project / "reports" / "samples.md").read_text()
    status = run_command(["dvc", "status"], project)
    assert "up to date" in status.stdout, status.stdout
