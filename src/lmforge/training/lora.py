"""LoRA (``finetune.method=lora``): low-rank adapters from ``peft`` injected into our GPT's linear
layers, everything else frozen; the adapters merged back into plain weights at the end.

``peft.inject_adapter_in_model`` wraps each ``finetune.lora.target_modules`` layer (by our module
names: ``c_attn``, ``c_proj``, ``c_fc``, see ``lmforge.model.gpt``) in place, so the model stays a
``GPT`` and Lightning, checkpoints and generation see the same module. ``merged_state_dict`` gives
the weights of a plain ``GPT`` (W + B A * alpha / r), which the model directory stores, so generate,
serve and export need nothing of this; ``adapter_state_dict`` gives the adapters alone (PEFT's key
format), which the model directory keeps beside them for ``lmforge export --adapter``.

It owns no optimizer (``training.optim`` puts the adapters under AdamW) and no file writing.
"""

from __future__ import annotations

import torch

from lmforge.errors import LmforgeError, missing_extra
from lmforge.model.gpt import GPT

METHODS = ("full", "lora")
TRAIN_EMBEDDINGS = ("auto", True, False)
# Our linear layers by name; what target_modules may name.
LORA_TARGETS = ("c_attn", "c_proj", "c_fc", "lm_head")
ADAPTER = "default"  # peft's adapter name
EMBEDDING_MODULES = ("transformer.wte", "lm_head")


def lora_config(finetune):
    """The ``peft.LoraConfig`` of ``finetune.lora`` (r, alpha, dropout, target_modules by name)."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise missing_extra("finetune.method=lora", "finetune", "or set finetune.method=full") from None
    lora = finetune.lora
    targets = [str(t) for t in lora.target_modules]
    return LoraConfig(r=int(lora.r), lora_alpha=float(lora.alpha), lora_dropout=float(lora.dropout),
                      target_modules=targets, bias="none")


def check_lora_settings(finetune) -> None:
    """One sentence for a method, train_embeddings or target_modules that is not one of ours."""
    if finetune.method not in METHODS:
        raise LmforgeError(f"finetune.method='{finetune.method}' is not one of {', '.join(METHODS)}.")
    if finetune.train_embeddings not in TRAIN_EMBEDDINGS:
        raise LmforgeError(f"finetune.train_embeddings={finetune.train_embeddings!r} is not one of auto, true, false.")
    targets = finetune.lora.target_modules
    if isinstance(targets, str):
        targets = [targets]
    if not targets or any(str(t) not in LORA_TARGETS for t in targets):
        raise LmforgeError(f"finetune.lora.target_modules={list(targets or [])} must name some of "
                           f"{', '.join(LORA_TARGETS)} (lmforge's linear layers, model/gpt.py).")


def apply_lora(model: GPT, finetune, added_tokens: int) -> None:
    """Inject the adapters of ``finetune.lora`` into ``model`` and freeze all else; the token
    embeddings and head train too under ``finetune.train_embeddings`` (auto: when ``added_tokens``)."""
    from peft import inject_adapter_in_model

    inject_adapter_in_model(lora_config(finetune), model, adapter_name=ADAPTER)
    for name, param in model.named_parameters():
        param.requires_grad = ".lora_" in name
    if embeddings_train(finetune, added_tokens):
        model.transformer.wte.weight.requires_grad = True
        model.lm_head.weight.requires_grad = True


def embeddings_train(finetune, added_tokens: int) -> bool:
    setting = finetune.train_embeddings
    return bool(added_tokens) if setting == "auto" else bool(setting)


def has_lora(model: torch.nn.Module) -> bool:
    return any(".lora_" in name for name, _ in model.named_parameters())


def trainable_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, each tensor once (tied embeddings are one), the frozen base included."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def trainable_names(model: torch.nn.Module, prefix: str = "") -> set[str]:
    """The state-dict keys of what trains (under every name a tied tensor has)."""
    return {prefix + name for name, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}


def _lora_layers(model: torch.nn.Module):
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            yield name, module


@torch.no_grad()
def merged_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The state dict of a plain ``GPT`` equal to ``model`` with its adapters merged (float32)."""
    state = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    for name, layer in _lora_layers(model):
        for part in ("weight", "bias"):
            key = f"{name}.base_layer.{part}"
            if key in state:
                state[f"{name}.{part}"] = state.pop(key)
        state[f"{name}.weight"] = state[f"{name}.weight"].float() + layer.get_delta_weight(ADAPTER).float()
    return {k: v.float() for k, v in state.items()}


@torch.no_grad()
def adapter_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The adapters alone in PEFT's saved form (``base_model.model.<module>.lora_A.weight``, float32),
    plus the embeddings and head when they trained (``<module>.weight``)."""
    out = {}
    for name, layer in _lora_layers(model):
        out[f"base_model.model.{name}.lora_A.weight"] = layer.lora_A[ADAPTER].weight.detach().float().clone()
        out[f"base_model.model.{name}.lora_B.weight"] = layer.lora_B[ADAPTER].weight.detach().float().clone()
    for module in EMBEDDING_MODULES:
        weight = model.get_submodule(module).weight
        if weight.requires_grad and has_lora(model):
            out[f"base_model.model.{module}.weight"] = weight.detach().float().clone()
    return out


def adapter_config(finetune, base_ref: str | None) -> dict:
    """``adapter_config.json`` for ``adapter_state_dict`` (PEFT's keys), naming our module names."""
    config = lora_config(finetune).to_dict()
    config.update({"peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_ref,
                   "target_modules": sorted(str(t) for t in finetune.lora.target_modules)})
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
