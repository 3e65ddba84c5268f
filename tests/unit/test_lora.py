"""LoRA (lmforge.training.lora) on our GPT with the real peft: what trains, how many, the optimizer
it gets, the merged weights, and the settings a careless user gets wrong."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from lmforge.config.compose import compose_config
from lmforge.errors import LmforgeError
from lmforge.model.gpt import GPT, GPTConfig
from lmforge.stages.check import problems, summary
from lmforge.training.lora import (
    adapter_state_dict,
    apply_lora,
    merged_state_dict,
    trainable_counts,
    trainable_names,
)
from lmforge.training.optim import MuonWithAdamW, build_optimizer
from tests.helpers import ROOT, make_model_dir


def finetune(**lora):
    settings = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["c_attn", "c_proj", "c_fc"], "lr": 2e-3}
    settings.update(lora)
    return OmegaConf.create({"method": "lora", "train_embeddings": "auto", "lora": settings})


def model(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{"vocab_size": 50, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32, **overrides}))


def test_only_the_adapters_train_and_they_are_counted():
    gpt = model()
    total_before = sum(p.numel() for p in gpt.parameters())
    apply_lora(gpt, finetune(), added_tokens=0)
    trainable, total = trainable_counts(gpt)
    # r * (in + out) per adapted layer: c_attn 32->96, c_proj 32->32, c_fc 32->128, c_proj 128->32, two blocks.
    assert trainable == 2 * 4 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))
    assert total == total_before + trainable
    assert all(".lora_" in name for name in trainable_names(gpt))


def test_embeddings_and_head_train_when_tokens_were_added():
    for added, setting, trains in ((3, "auto", True), (0, "auto", False), (0, True, True), (3, False, False)):
        gpt = model(tie_embeddings=False)
        settings = finetune()
        settings.train_embeddings = setting
        apply_lora(gpt, settings, added_tokens=added)
        assert gpt.transformer.wte.weight.requires_grad is trains and gpt.lm_head.weight.requires_grad is trains
        assert ("base_model.model.lm_head.weight" in adapter_state_dict(gpt)) is trains


def test_the_adapters_go_to_adamw_never_muon():
    muon = OmegaConf.create({"name": "muon", "lr": 1e-3, "min_lr_ratio": 0.1, "weight_decay": 0.1, "betas": [0.9, 0.99],
                             "eps": 1e-8, "muon_lr": 0.01, "muon_momentum": 0.95, "muon_weight_decay": 0.0,
                             "muon_adjust_lr": "original", "schedule": "cosine", "warmup_steps": 0})
    full = build_optimizer(model(), muon)
    assert isinstance(full, MuonWithAdamW) and sum(len(g["params"]) for g in full.muon.param_groups) == 2 * 4

    gpt = model()
    apply_lora(gpt, finetune(), added_tokens=0)
    lora = build_optimizer(gpt, muon, lora_lr=2e-3)
    assert isinstance(lora, torch.optim.AdamW)  # nothing 2-D inside the blocks trains but the factors
    groups = [g for g in lora.param_groups if g["lr"] == 2e-3]
    adapters = {id(p) for name, p in gpt.named_parameters() if ".lora_" in name}
    assert len(groups) == 1 and {id(p) for p in groups[0]["params"]} == adapters
    assert groups[0]["weight_decay"] == 0.0


def test_merged_weights_are_the_adapted_model():
    gpt = model()
    apply_lora(gpt, finetune(), added_tokens=0)
    with torch.no_grad():
        for name, param in gpt.named_parameters():
            if ".lora_B" in name:
                param.normal_()
    plain = model()
    plain.load_state_dict(merged_state_dict(gpt))
    x = torch.randint(0, 50, (2, 16))
    gpt.eval(), plain.eval()
    assert torch.allclose(gpt(x)[0], plain(x)[0], atol=1e-5)
    assert not torch.allclose(model().eval()(x)[0], plain(x)[0], atol=1e-3)


@pytest.mark.parametrize(("overrides", "says"), [
    (["finetune.method=qlora"], "finetune.method='qlora' is not one of full, lora"),
    (["finetune.lora.target_modules=[q_proj]"], "must name some of c_attn, c_proj, c_fc, lm_head"),
    (["finetune.lora.target_modules=[]"], "must name some of"),
    (["finetune.train_embeddings=sometimes"], "finetune.train_embeddings='sometimes' is not one of auto"),
    (["finetune.method=lora"], "finetune.method=lora needs a base to adapt"),
    (["finetune.lora.r=0"], "finetune.lora.r=0"),
    (["finetune.lora.dropout=1.5"], "finetune.lora.dropout=1.5"),
    (["finetune.base=models/gpt"], "finetune.base=models/gpt is where the train stage writes its model"),
    (["finetune.base=org/name", "train.init_from=bases/x"], "both name weights to start from"),
])
def test_careless_settings_are_one_sentence(overrides, says):
    cfg = compose_config(overrides, conf_dir=ROOT / "conf")
    found = problems(cfg, ROOT / "conf")
    assert len(found) == 1 and says in found[0], found


def test_check_reports_the_bases_architecture(tmp_path):
    # `lmforge check` with a base: the parameters are the base's, whatever model.* say.
    base = make_model_dir(tmp_path / "base", n_layer=3)
    cfg = compose_config(["experiment=finetune", f"finetune.base={base}", "model=gpt2-small"], conf_dir=ROOT / "conf")
    numbers = summary(cfg)
    assert numbers["vocab_source"] == f"the architecture of finetune.base={base}"
    from lmforge.model.directory import load_model_dir

    assert numbers["parameters"] == load_model_dir(base).model.num_params()
    assert problems(cfg, ROOT / "conf") == ["model.block_size=1024 is longer than the context of finetune.base="
                                            f"{base} (16 tokens); set model.block_size to at most 16."]


def test_lora_without_peft_names_the_extra(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_peft(name, *args, **kwargs):
        if name == "peft" or name.startswith("peft."):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_peft)
    from lmforge.training.lora import lora_config

    with pytest.raises(LmforgeError, match=r"pip install 'lmforge\[finetune\]'"):
        lora_config(finetune())


def test_loras_optimizer_state_is_under_5_percent_of_fulls_at_gpt2_small():
    # AdamW keeps two tensors per trainable weight, so the state's ratio is the trainable ratio
    # (benchmarks/finetune.py measures the bytes); counted on the meta device, nothing allocated.
    cfg = compose_config(["experiment=finetune", "model=gpt2-small", "finetune.method=lora"], conf_dir=ROOT / "conf")
    config = {**OmegaConf.to_container(cfg.model), "vocab_size": 50257}
    with torch.device("meta"):
        gpt = GPT(GPTConfig.from_dict(config))
        full = sum(p.numel() for p in gpt.parameters())
        apply_lora(gpt, cfg.finetune, added_tokens=0)
    trainable, _ = trainable_counts(gpt)
    assert 0 < trainable / full < 0.05
