"""``lmforge check`` and the pipeline's ``check`` stage: every check of a composed configuration.

``lmforge check [overrides]`` composes ``conf/`` as ``dvc exp run -S`` does and runs them all;
every stage runs the ones of what it reads (``lmforge.stages.runner.run_stage``), so a mistake stops
the pipeline before its first stage does any work. ``problems`` runs each check and collects the
sentences, so one call names them all. What a check cannot know without the machine
(``trainer.devices=auto``) is checked again when training starts.

The checks themselves live beside what they check; this module only gathers them, which is why
it sits above every package.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from lmforge.config.checks import check_dvc_paths, check_keys, check_precision, check_tokenizer, vocabulary
from lmforge.config.compose import CONF_DIR
from lmforge.config.rules import names, range_problems
from lmforge.errors import LmforgeError
from lmforge.inference.sampling import check_sampling
from lmforge.model.config import GPTConfig, check_model
from lmforge.model.gpt import GPT
from lmforge.outputs import write_json
from lmforge.training.checks import check_finetune, check_global_batch, check_training
from lmforge.training.optim import accumulation_steps

# Each stage runs the checks of what it reads, and none that would import more than it does
# (the training checks import Lightning); train, check and `lmforge check` run them all.
LIGHT_CHECKS: tuple[Callable[[DictConfig], None], ...] = (check_precision, check_tokenizer, check_dvc_paths)
CHECKS = (check_training, check_global_batch, check_finetune, check_model, check_sampling, *LIGHT_CHECKS)
STAGE_CHECKS = {"prepare": LIGHT_CHECKS, "vocab": LIGHT_CHECKS, "tokenize": LIGHT_CHECKS,
                "evaluate": (check_model, check_sampling, *LIGHT_CHECKS)}


def problems(cfg: DictConfig, conf_dir: str | Path = CONF_DIR, stage: str | None = None) -> list[str]:
    """One sentence per problem of ``cfg`` (empty when every check passes); ``stage``: only the
    checks that stage runs (``STAGE_CHECKS``; all of them for train, check or None). Keys and the
    range of every value (``config.rules``) come first, for every stage; a later check says nothing
    more of a value already refused."""
    found = []
    if (Path(conf_dir) / "config.yaml").is_file():
        try:
            check_keys(cfg, Path(conf_dir))
        except LmforgeError as err:
            found.append(str(err))
    refused = range_problems(cfg)
    found += refused
    named = [sentence.split("=", 1)[0] for sentence in refused]  # each opens with its key
    for check in STAGE_CHECKS.get(stage, CHECKS):
        try:
            check(cfg)
        except LmforgeError as err:
            if not any(names(str(err), key) for key in named):
                found.append(str(err))
        except Exception:
            if not found:
                raise
            # Otherwise a consequence of a problem already named: a check read a value refused above.
    return found


def check_config(cfg: DictConfig, conf_dir: str | Path = CONF_DIR, stage: str | None = None) -> None:
    """LmforgeError listing every problem of ``cfg``, one sentence each; nothing when it is sound."""
    found = problems(cfg, conf_dir, stage)
    if found:
        raise LmforgeError(found[0] if len(found) == 1 else "\n".join(["the configuration has problems:", *found]))


def summary(cfg: DictConfig) -> dict[str, Any]:
    """Parameters, training FLOPs per token, vocabulary size (and its source) and micro-batches per
    optimizer step per device (None while ``trainer.devices`` is not a number)."""
    config = OmegaConf.to_container(cfg.model, resolve=True)
    config["vocab_size"], source = vocabulary(cfg)
    from lmforge.training.finetune import base_summary

    base = base_summary(cfg)  # a fine-tune trains its base's architecture, whatever model.* say
    if base is not None:
        config, source = base[0].to_dict(), base[1]
    elif cfg.get("finetune") is not None and cfg.finetune.get("base"):
        source = (f"finetune.base={cfg.finetune.base} is not fetched yet (the vocab stage fetches it), so these "
                  "numbers are model.*'s, not the base's")
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
    check_config(cfg)
    numbers = summary(cfg)
    write_json(Path(str(cfg.paths.reports)) / "check.json", numbers)
    print(summary_line(numbers))
    return summary_line(numbers)
