"""`lmforge check`: every data-free, accelerator-free check of a composed configuration, and the
same checks in the stages (and in `dvc exp run`, through the pipeline's check stage)."""

from __future__ import annotations

import pytest

from lmforge.config.compose import compose_config
from lmforge.errors import LmforgeError
from lmforge.stages.check import check_config, problems, summary, summary_line
from tests.helpers import ROOT, run_cli


@pytest.fixture(autouse=True)
def in_project(monkeypatch):
    monkeypatch.chdir(ROOT)


def test_the_default_config_passes_with_a_one_line_summary(capsys):
    code, out, err = run_cli(["check"], capsys)
    assert code == 0 and err == ""
    assert out.count("\n") == 1 and out.startswith("ok: ")
    assert "parameters" in out and "MFLOP per token" in out
    assert "1 micro-batch(es) per step on each of 1 device(s)" in out


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["+optimizer.lrr=0.5"], ["'optimizer.lrr'", "did you mean optimizer.lr"]),
        (["train.batch_size=0.5"], ["train.batch_size=0.5 must be a positive integer"]),
        (["tracking.log_model=1"], ["tracking.log_model=1", "wrong type", "bool"]),
        (["model=gpt2-small", "train.global_batch_tokens=524288"], ["12 * 1024 * 1 = 12288"]),
        (["model=llama-small", "trainer=fsdp", "trainer.devices=8"], ["optimizer=muon", "fsdp"]),
        (["model=tiny", "trainer.devices=8", "trainer.num_nodes=4", "train.global_batch_tokens=1048576"],
         ["12 * 32 * 32 = 12288"]),
        (["trainer.precision=16-mixed"], ["trainer.precision=16-mixed is not supported on a CPU"]),
        (["trainer.precision=64"], ["trainer.precision='64' is not one of"]),
        (["trainer.float32_matmul_precision=fast"],
         ["trainer.float32_matmul_precision='fast' is not one of auto, highest, high, medium"]),
        (["optimizer.muon_ns_scheme=polar"], ["optimizer.muon_ns_scheme='polar' is not one of torch, polar_express"]),
        (["optimizer.muon_adjust_lr=moonshot"], ["optimizer.muon_adjust_lr='moonshot' is not one of"]),
        (["optimizer.muon_ns_steps=0"], ["optimizer.muon_ns_steps=0 must be an integer"]),
        (["optimizer.muon_normuon_beta2=1"], ["optimizer.muon_normuon_beta2=1 must be"]),
        (["model.n_head=3"], ["model.n_head=3"]),
        (["evaluate.top_p=2"], ["evaluate.top_p=2"]),
        (["tokenizer=bpe", "tokenizer.lowercase=true"], ["tokenizer.lowercase=true does nothing"]),
        (["tokenizer.min_frequency=5"], ["tokenizer.min_frequency=5 does nothing for tokenizer.kind=char"]),
    ],
)
def test_each_problem_is_one_sentence_naming_it(capsys, overrides, words):
    code, out, err = run_cli(["check", *overrides], capsys)
    assert code == 1 and out == ""
    for word in words:
        assert word in err


def test_every_problem_is_named_at_once():
    cfg = compose_config(["evaluate.top_p=2", "tokenizer=bpe", "tokenizer.lowercase=true", "+model.typo=1"])
    found = problems(cfg)
    assert all(p.count("\n") == 0 for p in found)
    for fragment in ("'model.typo'", "evaluate.top_p=2", "tokenizer.lowercase=true"):
        assert any(fragment in p for p in found), fragment
    with pytest.raises(LmforgeError, match="the configuration has problems:\n"):
        check_config(cfg)


def test_the_readme_recipes_as_they_were_fail_and_as_they_are_pass():
    # Issue 10: gpt2-small's micro-batch is 12 x 1024 tokens, and FSDP does not take Muon.
    old = ["model=gpt2-small", "tokenizer=bpe", "trainer=ddp", "train.global_batch_tokens=524288"]
    assert problems(compose_config(old))
    assert not problems(compose_config([*old, "train.batch_size=16"]))
    slurm = ["model=llama-small", "tokenizer=bpe", "trainer=fsdp", "trainer.devices=8", "trainer.num_nodes=4",
             "train.global_batch_tokens=1048576"]
    assert len(problems(compose_config(slurm))) == 1  # Muon with FSDP (the batch is refused by the same check first)
    fixed = compose_config([*slurm, "optimizer=adamw", "train.batch_size=8"])
    assert not problems(fixed)
    assert summary(fixed)["micro_batches"] == 4 and summary(fixed)["devices"] == 32
    assert summary_line(summary(fixed)).startswith("ok: ")


def test_paths_under_dvc_must_be_the_declared_outputs(monkeypatch):
    cfg = compose_config(["paths.prepared=elsewhere"])
    assert not problems(cfg)  # a stage run by hand may write anywhere
    monkeypatch.setenv("DVC_ROOT", str(ROOT))
    assert any("paths.prepared=elsewhere differs from data/prepared" in p for p in problems(cfg))


def test_stages_run_the_checks(tmp_path, monkeypatch, capsys):
    from lmforge.config.compose import write_params

    write_params(compose_config(["tokenizer=bpe", "tokenizer.lowercase=true"]), tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)  # no conf/ here: the stage reads params.yaml only
    code, out, err = run_cli(["prepare"], capsys)
    assert code == 1 and "tokenizer.lowercase=true does nothing" in err
    assert not (tmp_path / "data").exists()


