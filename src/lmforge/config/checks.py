"""Every check of a composed configuration that needs no data and no accelerator.

``lmforge check [overrides]`` composes ``conf/`` as ``dvc exp run -S`` does and runs them all;
every stage runs them on the config it reads (``lmforge.stages.runner.run_stage``), so a mistake stops the
pipeline before its first stage does any work. A check is a function that raises LmforgeError
with one sentence; ``problems`` runs each and collects the sentences, so one call names them all.
What a check cannot know without the machine (``trainer.devices=auto``) is checked again when
training starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from lmforge.config.compose import check_known_keys, conf_files, flat_items, flat_params, is_global_group
from lmforge.config.paths import DVC_OUTPUTS
from lmforge.config.rules import RULES, problem
from lmforge.config.values import is_mapping, kind_name, same_kind
from lmforge.errors import LmforgeError

PRECISIONS = ("auto", "32", "bf16-mixed", "16-mixed", "bf16-true")  # Lightning's, and auto: hardware.resolve_precision
# Lightning refuses fp16 autocast on a CPU; every other precision runs there.
CPU_PRECISIONS = ("auto", "32", "bf16-mixed", "bf16-true")
# What a tokenizer kind reads of its settings (vocab.py): anything else set away from its default
# would do nothing, silently.
TOKENIZER_SETTINGS = {"char": (), "word": ("lowercase", "min_frequency"), "bpe": ("min_frequency",)}


def check_keys(cfg: DictConfig, conf_dir: Path) -> None:
    """Every config group there, no unknown key at any level, then a value of a type no file in
    ``conf/`` gives that key (keys with a range rule are judged by it: ``config.rules``)."""
    for group in sorted(p.name for p in conf_dir.iterdir() if p.is_dir() and not is_global_group(p)):
        if not is_mapping(cfg.get(group)):
            choices = ", ".join(sorted(p.stem for p in (conf_dir / group).glob("*.yaml")))
            raise LmforgeError(f"the configuration has no '{group}' group (an override removed it); "
                               f"choose one with {group}=CHOICE, valid choices: {choices}.")
    check_known_keys(cfg, conf_dir, source="the configuration")
    seen = conf_types(conf_dir)
    for key, value in flat_params(cfg).items():
        if key in RULES or not seen.get(key):
            continue
        if not any(same_kind(value, example) for example in seen[key]):
            expected = " or ".join(sorted({kind_name(e) for e in seen[key]}))
            raise LmforgeError(f"{key}={value!r} has the wrong type: conf/ gives it type {expected}.")


def conf_types(conf_dir: Path) -> dict[str, list[Any]]:
    """For each dotted key, the non-null values the files of ``conf_dir`` give it (one per type)."""
    found: dict[str, list[Any]] = {}
    for prefix, body in conf_files(conf_dir) or []:
        for key, value in flat_items(body).items():
            examples = found.setdefault(prefix + key, [])
            if value is not None and not any(type(e) is type(value) for e in examples):
                examples.append(value)
    return found


def check_precision(cfg: DictConfig) -> None:
    """A precision the accelerator supports (fp16 autocast is refused on a CPU)."""
    trainer = cfg.trainer
    if trainer.accelerator == "cpu" and str(trainer.precision) not in CPU_PRECISIONS:
        raise LmforgeError(f"trainer.precision={trainer.precision} is not supported on a CPU; "
                           f"use one of {', '.join(CPU_PRECISIONS)} (auto picks the faster of 32 and bf16-mixed "
                           "on this machine: `lmforge info`).")


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


def vocabulary(cfg: DictConfig) -> tuple[int, str]:
    """The vocabulary size the checks assume, and why: ``tokenizer.vocab_size``, or 256 for a
    character vocabulary (its size is the training split's alphabet, known after the vocab stage).
    A pure function of the config, so the ``check`` stage depends on nothing else."""
    size = cfg.tokenizer.get("vocab_size")
    if size and problem("tokenizer.vocab_size", size) is None:  # one out of range is refused on its own
        return int(size), "tokenizer.vocab_size"
    return 256, "assumed until the vocab stage has run"
