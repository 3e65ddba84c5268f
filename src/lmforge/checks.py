"""Every check of a composed configuration that needs no data and no accelerator.

``lmforge check [overrides]`` composes ``conf/`` as ``dvc exp run -S`` does and runs them all;
every stage runs them on the config it reads (``lmforge.cli.run_stage``), so a mistake stops the
pipeline before its first stage does any work. A check is a function that raises LmforgeError
with one sentence; ``problems`` runs each and collects the sentences, so one call names them all.
What a check cannot know without the machine (``trainer.devices=auto``) is checked again when
training starts.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lmforge.config import CONF_DIR, check_known_keys, flat_keys
from lmforge.errors import LmforgeError

PRECISIONS = ("auto", "32", "bf16-mixed", "16-mixed", "bf16-true")  # Lightning's, and auto: hardware.resolve_precision
# Lightning refuses fp16 autocast on a CPU; every other precision runs there.
CPU_PRECISIONS = ("auto", "32", "bf16-mixed", "bf16-true")
# What a tokenizer kind reads of its settings (vocab.py): anything else set away from its default
# would do nothing, silently.
TOKENIZER_SETTINGS = {"char": (), "word": ("lowercase", "min_frequency"), "bpe": ("min_frequency",)}
# List keys that also take a single string (``data.sources=corpus/books``).
ONE_OR_MANY = ("data.sources",)
# The paths that dvc.yaml names as literal outputs: under DVC a stage must write where they say.
DVC_OUTPUTS = {"prepared": "data/prepared", "vocab": "data/vocab", "tokens": "data/tokens",
               "model": "models/gpt", "checkpoints": "models/checkpoints", "reports": "reports"}


def check_keys(cfg: DictConfig, conf_dir: Path) -> None:
    """Unknown keys at every level, then a value of a type no file in ``conf/`` gives that key."""
    check_known_keys(cfg, conf_dir, source="the configuration")
    seen = conf_types(conf_dir)
    for key in flat_keys(cfg):
        value = OmegaConf.select(cfg, key)
        if value is None or key not in seen or not seen[key]:
            continue
        if key in ONE_OR_MANY and isinstance(value, str):
            continue
        if not any(_same_kind(value, example) for example in seen[key]):
            expected = " or ".join(sorted({type(e).__name__ for e in seen[key]}))
            raise LmforgeError(f"{key}={value!r} has the wrong type: conf/ gives it type {expected}.")


def conf_types(conf_dir: Path) -> dict[str, list[Any]]:
    """For each dotted key, the non-null values the files of ``conf_dir`` give it (one per type)."""
    import yaml

    found: dict[str, list[Any]] = {}

    def add(body: Any, prefix: str) -> None:
        cfg = OmegaConf.create(body or {})
        for key in flat_keys(cfg):
            value = OmegaConf.select(cfg, key)
            examples = found.setdefault(prefix + key, [])
            if value is not None and not any(type(e) is type(value) for e in examples):
                examples.append(OmegaConf.to_container(value) if OmegaConf.is_config(value) else value)

    add(yaml.safe_load((conf_dir / "config.yaml").read_text(encoding="utf-8")), "")
    for option in conf_dir.glob("*/*.yaml"):
        add(yaml.safe_load(option.read_text(encoding="utf-8")), option.parent.name + ".")
    return found


def _same_kind(value: Any, example: Any) -> bool:
    if isinstance(example, bool) or isinstance(value, bool):
        return isinstance(example, bool) and isinstance(value, bool)
    if isinstance(example, (int, float)):
        # A float key takes an int (lr=1); an int key does not take 0.5.
        return isinstance(value, (int, float)) and (isinstance(example, float) or float(value).is_integer())
    if isinstance(example, (list, tuple)) or OmegaConf.is_list(example):
        return isinstance(value, (list, tuple)) or OmegaConf.is_list(value)
    if isinstance(example, dict):
        return OmegaConf.is_dict(value) or isinstance(value, dict)
    # A string key takes any scalar: Hydra reads `trainer.precision=32` as the number 32.
    return not (OmegaConf.is_config(value) or isinstance(value, (list, dict)))


def check_training(cfg: DictConfig) -> None:
    """The train stage's own checks, the first problem only: choices, positive counts, micro-batches
    per step for the given devices and nodes, optimizer and strategy."""
    from lmforge.training.optim import OPTIMIZERS, SCHEDULES, accumulation_steps
    from lmforge.training.resume import RESUME

    t, opt, trainer = cfg.train, cfg.optimizer, cfg.trainer
    choices = (("trainer.precision", str(trainer.precision), PRECISIONS), ("train.resume", t.resume, RESUME),
               ("optimizer.schedule", opt.schedule, SCHEDULES), ("optimizer.name", opt.name, OPTIMIZERS))
    for key, value, valid in choices:
        if value not in valid:
            raise LmforgeError(f"{key}='{value}' is not one of {', '.join(valid)}; set it in conf/ or override it.")
    for key in ("max_steps", "batch_size", "eval_interval", "eval_iters", "log_every", "checkpoint_every"):
        if not isinstance(t[key], int) or isinstance(t[key], bool) or t[key] < 1:
            raise LmforgeError(f"train.{key}={t[key]!r} must be a positive integer.")
    patience = t.early_stopping_patience
    if patience is not None and (not isinstance(patience, int) or patience < 1):
        raise LmforgeError(f"train.early_stopping_patience={patience!r} must be a positive integer or null.")
    if isinstance(trainer.devices, int) and trainer.devices > 0:  # else checked once Lightning knows the devices
        accumulation_steps(t.global_batch_tokens, int(t.batch_size), int(cfg.model.block_size),
                           trainer.devices * int(trainer.num_nodes))
    if opt.name == "muon" and "fsdp" in str(trainer.strategy):
        raise LmforgeError("optimizer=muon needs whole weight matrices, which trainer.strategy=fsdp shards; "
                           "use optimizer=adamw with FSDP, or trainer=ddp.")


def check_precision(cfg: DictConfig) -> None:
    """A precision the accelerator supports (fp16 autocast is refused on a CPU)."""
    trainer = cfg.trainer
    if trainer.accelerator == "cpu" and str(trainer.precision) not in CPU_PRECISIONS:
        raise LmforgeError(f"trainer.precision={trainer.precision} is not supported on a CPU; "
                           f"use one of {', '.join(CPU_PRECISIONS)} (auto picks the faster of 32 and bf16-mixed "
                           "on this machine: `lmforge info`).")


def check_model(cfg: DictConfig) -> None:
    """The model settings make a model (``GPTConfig.validate``) at the vocabulary size of ``vocabulary``."""
    from lmforge.model_config import GPTConfig

    config = OmegaConf.to_container(cfg.model, resolve=True)
    config["vocab_size"] = vocabulary(cfg)[0]
    try:
        GPTConfig.from_dict(config).validate()
    except (ValueError, TypeError) as err:
        raise LmforgeError(str(err).rstrip(".").replace("config.", "model.") + ".") from None


def check_sampling(cfg: DictConfig) -> None:
    """The evaluate stage's sampling settings are in range."""
    from lmforge.generation import SamplingConfig

    e = cfg.evaluate
    sampling = SamplingConfig(max_new_tokens=e.max_new_tokens, temperature=e.temperature, top_k=e.top_k,
                              top_p=e.top_p, seed=e.seed)
    try:
        sampling.validate()
    except ValueError as err:
        raise LmforgeError(str(err).replace("sampling.", "evaluate.")) from None


def check_tokenizer(cfg: DictConfig) -> None:
    """A tokenizer setting that its kind ignores is refused rather than silently doing nothing."""
    t = cfg.tokenizer
    reads = TOKENIZER_SETTINGS.get(t.kind)
    if reads is None:
        raise LmforgeError(f"tokenizer.kind='{t.kind}' is not one of {', '.join(TOKENIZER_SETTINGS)}.")
    if "lowercase" not in reads and t.get("lowercase"):
        raise LmforgeError(f"tokenizer.lowercase=true does nothing for tokenizer.kind={t.kind} (only word "
                           "tokenizers lowercase); set it to false, or use tokenizer=word.")
    if "min_frequency" not in reads and t.get("min_frequency") not in (None, 0, 1):
        raise LmforgeError(f"tokenizer.min_frequency={t.min_frequency} does nothing for tokenizer.kind={t.kind} "
                           "(every character of the training split is kept); set it to 1.")


def check_dvc_paths(cfg: DictConfig) -> None:
    """Under ``dvc repro``/``dvc exp run``, ``paths.*`` must be the outputs dvc.yaml declares."""
    if not os.environ.get("DVC_ROOT"):
        return  # a stage run by hand may write anywhere
    for key, declared in DVC_OUTPUTS.items():
        value = cfg.paths.get(key)
        if value is not None and Path(str(value)) != Path(declared):
            raise LmforgeError(f"paths.{key}={value} differs from {declared}, the output dvc.yaml declares, so DVC "
                               f"would not track it; change paths.* only for stages run by hand (lmforge {key} ...).")


def check_global_batch(cfg: DictConfig) -> None:
    """With ``trainer.devices=auto`` the world size is known only at run time; the global batch
    must still be a whole number of one device's micro-batches."""
    from lmforge.training.optim import accumulation_steps

    t = cfg.train
    if not isinstance(cfg.trainer.devices, int):
        accumulation_steps(t.global_batch_tokens, int(t.batch_size), int(cfg.model.block_size), 1)


# Each stage runs the checks of what it reads, and none that would import more than it does
# (the training checks import Lightning); train, check and `lmforge check` run them all.
LIGHT_CHECKS: tuple[Callable[[DictConfig], None], ...] = (check_precision, check_tokenizer, check_dvc_paths)
CHECKS = (check_training, check_global_batch, check_model, check_sampling, *LIGHT_CHECKS)
STAGE_CHECKS = {"prepare": LIGHT_CHECKS, "vocab": LIGHT_CHECKS, "tokenize": LIGHT_CHECKS,
                "evaluate": (check_model, check_sampling, *LIGHT_CHECKS)}


def problems(cfg: DictConfig, conf_dir: str | Path = CONF_DIR, stage: str | None = None) -> list[str]:
    """One sentence per problem of ``cfg`` (empty when every check passes); ``stage``: only the
    checks that stage runs (``STAGE_CHECKS``; all of them for train, check or None)."""
    found = []
    keys = lambda c: check_keys(c, Path(conf_dir)) if (Path(conf_dir) / "config.yaml").is_file() else None  # noqa: E731
    for check in (keys, *STAGE_CHECKS.get(stage, CHECKS)):
        try:
            check(cfg)
        except LmforgeError as err:
            found.append(str(err))
    return found


def check_config(cfg: DictConfig, conf_dir: str | Path = CONF_DIR, stage: str | None = None) -> None:
    """LmforgeError listing every problem of ``cfg``, one sentence each; nothing when it is sound."""
    found = problems(cfg, conf_dir, stage)
    if found:
        raise LmforgeError(found[0] if len(found) == 1 else "\n".join(["the configuration has problems:", *found]))


def vocabulary(cfg: DictConfig) -> tuple[int, str]:
    """The vocabulary size the checks assume, and why: ``tokenizer.vocab_size``, or 256 for a
    character vocabulary (its size is the training split's alphabet, known after the vocab stage).
    A pure function of the config, so the ``check`` stage depends on nothing else."""
    if cfg.tokenizer.get("vocab_size"):
        return int(cfg.tokenizer.vocab_size), "tokenizer.vocab_size"
    return 256, "assumed until the vocab stage has run"


def summary(cfg: DictConfig) -> dict[str, Any]:
    """Parameters, training FLOPs per token, vocabulary size (and its source) and micro-batches per
    optimizer step per device (None while ``trainer.devices`` is not a number)."""
    import torch

    from lmforge.model import GPT
    from lmforge.model_config import GPTConfig
    from lmforge.training.optim import accumulation_steps

    config = OmegaConf.to_container(cfg.model, resolve=True)
    config["vocab_size"], source = vocabulary(cfg)
    with torch.device("meta"):  # counts without allocating: gpt2-medium is 350M parameters
        model = GPT(GPTConfig.from_dict(config))
    t, trainer = cfg.train, cfg.trainer
    micro = world = None
    if isinstance(trainer.devices, int):
        world = int(trainer.devices) * int(trainer.num_nodes)
        micro = accumulation_steps(t.global_batch_tokens, int(t.batch_size), int(cfg.model.block_size), world)
    return {"parameters": model.num_params(), "flops_per_token": model.flops_per_token(),
            "vocab_size": config["vocab_size"], "vocab_source": source, "devices": world, "micro_batches": micro}


def summary_line(numbers: dict[str, Any]) -> str:
    """``summary`` as the one line ``lmforge check`` prints."""
    if numbers["micro_batches"] is None:
        batches = "micro-batches per step known when training starts (trainer.devices is not a number)"
    else:
        batches = f"{numbers['micro_batches']} micro-batch(es) per step on each of {numbers['devices']} device(s)"
    return (f"ok: {numbers['parameters']:,} parameters, {numbers['flops_per_token'] / 1e6:.1f} MFLOP per token "
            f"(vocabulary {numbers['vocab_size']}: {numbers['vocab_source']}), {batches}")


def check_stage(cfg: DictConfig) -> str:
    """The pipeline's ``check`` stage: every check, then the summary written to ``reports/check.json``
    (``dvc metrics show``). It declares every parameter, so DVC runs it on any change, a key no
    other stage reads included."""
    from lmforge.outputs import write_json

    check_config(cfg)
    numbers = summary(cfg)
    write_json(Path(str(cfg.paths.reports)) / "check.json", numbers)
    print(summary_line(numbers))
    return summary_line(numbers)
