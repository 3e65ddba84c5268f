"""End to end: `dvc exp run -S experiment=finetune -S finetune.base=BASE` in a temporary copy of the
project composes the experiment with DVC's own Hydra, adopts the base's tokenizer in the vocab
stage, tunes the base, scores it beside the result, and leaves a pipeline DVC calls up to date."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.helpers import TINY_PIPELINE, copy_project, make_model_dir, run_command

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("method", ["lora"])
def test_dvc_exp_run_finetunes_a_base(tmp_path, method):
    base = make_model_dir(tmp_path / "base", block_size=32)
    project = copy_project(tmp_path / "project", TINY_PIPELINE)
    overrides = ["experiment=finetune", f"finetune.base={base}", f"finetune.method={method}", *TINY_PIPELINE,
                 "train.max_steps=6", "train.eval_interval=3", "train.checkpoint_every=3", "tracking.log_model=false"]
    run_command(["dvc", "exp", "run", *[f"-S{o}" for o in overrides]], project)

    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["finetune"]["base"] == str(base) and params["optimizer"]["name"] == "adamw"
    assert "experiment" not in params
    assert json.loads((project / "data/vocab/base.json").read_text())["ref"] == str(base)
    assert (project / "data/vocab/tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert {"val_loss", "base_val_loss"} <= set(metrics)
    assert (project / "models/gpt/adapter_model.safetensors").is_file()
    status = run_command(["dvc", "status"], project).stdout
    assert "changed" not in status, status
    vocab = json.loads((project / "reports/vocab.json").read_text())
    assert vocab["kind"] == "base" and vocab["base"] == str(base)
