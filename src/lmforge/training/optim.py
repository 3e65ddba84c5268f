"""The optimisation of a training step: learning-rate schedule, AdamW or Muon+AdamW, and how many
micro-batches make one optimizer step. Plain PyTorch: no Lightning, no MLflow.

AdamW puts weight decay on matrices only; ``muon`` runs Muon on the 2-D weight matrices inside
the transformer blocks and AdamW on the rest. Every param group follows one schedule: linear
warmup, then constant or a linear/cosine decay to ``min_lr_ratio`` of the peak.
"""

from __future__ import annotations

import math

import torch

from lmforge.errors import LmforgeError
from lmforge.model.gpt import GPT
from lmforge.training import hardware
from lmforge.training.muon import Muon

SCHEDULES = ("cosine", "linear", "constant", "wsd")
OPTIMIZERS = ("adamw", "muon")
FUSED_ADAMW_DEVICES = ("cuda", "cpu")  # one kernel for the whole update instead of a dozen per tensor


def lr_factor(step: int, opt_cfg, max_steps: int) -> float:
    """The learning rate at optimizer step ``step`` (from 0) as a fraction of the peak rate.

    Linear warmup over ``warmup_steps``, then ``constant``, or a ``linear``/``cosine`` decay that
    reaches ``min_lr_ratio`` at ``max_steps``, or ``wsd`` (warmup-stable-decay, Hu et al. 2024):
    the peak until the last ``cooldown_fraction`` of the steps, then a linear decay to
    ``min_lr_ratio``. Every param group (Muon's too) follows this factor.
    """
    warmup, floor = int(opt_cfg.warmup_steps), float(opt_cfg.min_lr_ratio)
    if step < warmup:
        return (step + 1) / warmup
    if opt_cfg.schedule == "constant":
        return 1.0
    if opt_cfg.schedule == "wsd":
        cooldown = float(opt_cfg.get("cooldown_fraction", 0.0)) * max_steps
        left = max_steps - step
        return 1.0 if left >= cooldown else floor + (1.0 - floor) * left / cooldown
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    if opt_cfg.schedule == "linear":
        return 1.0 - (1.0 - floor) * progress
    if opt_cfg.schedule == "cosine":
        return floor + 0.5 * (1.0 - floor) * (1.0 + math.cos(math.pi * progress))
    raise LmforgeError(f"optimizer.schedule='{opt_cfg.schedule}' is not one of {', '.join(SCHEDULES)}.")


def lr_at(step: int, opt_cfg, max_steps: int) -> float:
    """The (AdamW) learning rate at optimizer step ``step``: ``lr * lr_factor(step)``."""
    return float(opt_cfg.lr) * lr_factor(step, opt_cfg, max_steps)


def adamw_groups(params: list[torch.nn.Parameter], matrices: set[int], weight_decay: float,
                 embeddings: set[int] = frozenset(), embedding_lr: float | None = None) -> list[dict]:
    """AdamW's param groups: weight decay on the ``matrices`` (ids), none on biases and gains; with
    ``embedding_lr``, the ``embeddings`` (ids, decayed too) in a group of their own at that rate."""
    own = embeddings if embedding_lr is not None else set()
    groups = [
        {"params": [p for p in params if id(p) in matrices and id(p) not in own], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) not in matrices], "weight_decay": 0.0},
    ]
    if own:
        groups.append({"params": [p for p in params if id(p) in own], "weight_decay": weight_decay,
                       "lr": float(embedding_lr)})
    return [g for g in groups if g["params"]]


def row_blocks(model: GPT) -> dict[int, tuple[int, ...]]:
    """The fused matrices of ``model``'s blocks (ids) and the row counts of the matrices they join:
    attention's [queries | keys | values] and SwiGLU's [gate | up]."""
    c = model.config
    blocks = {}
    for block in model.transformer.h:
        blocks[id(block.attn.c_attn.weight)] = (c.n_head * c.head_dim, c.kv_heads * c.head_dim, c.kv_heads * c.head_dim)
        if c.mlp == "swiglu":
            blocks[id(block.mlp.c_fc.weight)] = (c.mlp_hidden_size, c.mlp_hidden_size)
    return blocks


def build_optimizer(model: GPT, opt_cfg, fused: bool = False, lora_lr: float | None = None) -> torch.optim.Optimizer:
    """The optimizer ``optimizer.name`` names, for ``model``.

    ``adamw``: AdamW over everything (decay on matrices only). ``muon``: Muon (``training.muon``) on the
    2-D weight matrices inside the transformer blocks, AdamW on embeddings, head, gains and biases.
    ``fused``: the fused AdamW kernel (CUDA and CPU). Parameters are told apart by the layer that
    owns them, not by their shape, which FSDP flattens.

    LoRA's adapter factors (``.lora_`` in their name; only they and perhaps the embeddings train)
    are AdamW's at ``lora_lr``, never Muon's: Muon orthogonalises a full matrix's update, and each
    factor is a thin rank-r matrix whose update Muon would scale by sqrt(rows / r), far from the
    step its product needs. Without a 2-D block matrix that trains, Muon has nothing: AdamW alone.
    """
    if opt_cfg.name not in OPTIMIZERS:
        raise LmforgeError(f"optimizer.name='{opt_cfg.name}' is not one of {', '.join(OPTIMIZERS)}.")
    adamw = dict(lr=float(opt_cfg.lr), betas=tuple(opt_cfg.betas), eps=float(opt_cfg.eps))
    embedding_lr = opt_cfg.get("embedding_lr")
    if fused:
        adamw["fused"] = True
    lora = [p for name, p in model.named_parameters() if ".lora_" in name and p.requires_grad]
    lora_ids = {id(p) for p in lora}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in lora_ids]
    matrices = {id(m.weight) for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))}
    embeddings = {id(m.weight) for m in model.transformer.values() if isinstance(m, torch.nn.Embedding)}
    lora_groups = [{"params": lora, "weight_decay": 0.0, "lr": float(lora_lr or opt_cfg.lr)}] if lora else []
    hidden = {id(m.weight) for m in model.transformer.h.modules() if isinstance(m, torch.nn.Linear)}
    if opt_cfg.name == "adamw" or not any(id(p) in hidden for p in params):
        groups = adamw_groups(params, matrices, float(opt_cfg.weight_decay), embeddings, embedding_lr)
        return torch.optim.AdamW(groups + lora_groups, **adamw)
    muon = Muon(  # torch.optim.Muon, orthogonalising in the device's native dtype (lmforge.hardware)
        [p for p in params if id(p) in hidden],
        ns_dtype=hardware.muon_dtype(params[0].device),
        lr=float(opt_cfg.muon_lr),
        momentum=float(opt_cfg.muon_momentum),
        weight_decay=float(opt_cfg.muon_weight_decay),
        nesterov=True,
        adjust_lr_fn=opt_cfg.muon_adjust_lr,
        row_blocks=row_blocks(model) if opt_cfg.get("muon_split", False) else None,
        ns_steps=int(opt_cfg.get("muon_ns_steps", 5)),
        ns_scheme=opt_cfg.get("muon_ns_scheme", "torch"),
        normuon_beta2=opt_cfg.get("muon_normuon_beta2"),
    )
    rest = [p for p in params if id(p) not in hidden]
    groups = adamw_groups(rest, matrices, float(opt_cfg.weight_decay), embeddings, embedding_lr)
    return MuonWithAdamW(muon, torch.optim.AdamW(groups + lora_groups, **adamw))


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon and AdamW stepped as one optimizer, so Lightning's automatic optimization (gradient
    accumulation, clipping, mixed precision, schedulers) applies to both unchanged.

    ``param_groups`` are the two optimizers' own group dicts: a scheduler that scales a group's
    ``lr`` scales the optimizer that reads it. The state dict holds both inner state dicts.
    """

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        self.muon, self.adamw = muon, adamw
        # Optimizer.__init__ adopts these very dicts (add_param_group appends the dict it is given).
        super().__init__(muon.param_groups + adamw.param_groups, defaults={})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
        # Loading replaces the inner group dicts: share the new ones again.
        self.param_groups = self.muon.param_groups + self.adamw.param_groups


def accumulation_steps(global_batch_tokens: int | None, batch_size: int, block_size: int, world_size: int) -> int:
    """Micro-batches per optimizer step so that a step sees ``global_batch_tokens`` tokens.

    None means one micro-batch per device (no accumulation). LmforgeError when the global batch
    is not a whole number of micro-batches of ``batch_size * block_size`` tokens on every device.
    """
    if global_batch_tokens is None:
        return 1
    per_pass = batch_size * block_size * world_size
    if global_batch_tokens <= 0 or global_batch_tokens % per_pass:
        raise LmforgeError(
            f"train.global_batch_tokens={global_batch_tokens} is not a positive multiple of "
            f"train.batch_size * model.block_size * devices = {batch_size} * {block_size} * {world_size} = {per_pass}; "
            f"set it to a multiple of {per_pass} (or null for no accumulation)."
        )
    return global_batch_tokens // per_pass
