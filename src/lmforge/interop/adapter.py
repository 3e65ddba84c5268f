"""A LoRA fine-tune's adapters as a PEFT adapter directory for the ``transformers`` export of its base
(``lmforge export --model DIR --adapter OUT``).

The model directory of ``finetune.method=lora`` keeps its adapters under our module names
(``adapter_model.safetensors``, ``adapter_config.json``: ``lmforge.training.lora``). Here they are
renamed to the modules of ``GPT2LMHeadModel`` or ``LlamaForCausalLM`` by the weight table
(``lmforge.interop.weights``): a Llama's fused ``c_attn`` adapter becomes q, k and v adapters that
share A and split B's rows (``(B A)`` restricted to q's rows is ``B_q A``), ``c_fc`` becomes gate
and up; GPT-2 keeps our names and stores its matrices transposed (``fan_in_fan_out``). The result
loads with ``peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE_HF), OUT)``
where BASE_HF is the base exported with ``lmforge export --format hf``.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from lmforge.config.paths import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from lmforge.errors import LmforgeError
from lmforge.interop.hf_config import GPT2, hf_family
from lmforge.interop.weights import hf_modules
from lmforge.model.config import GPTConfig
from lmforge.outputs import atomic_path

PREFIX = "base_model.model."


def export_adapter(model_dir: str | Path, out: str | Path) -> Path:
    """Write the adapters of the LoRA model directory ``model_dir`` as a PEFT directory ``out``."""
    model_dir = Path(model_dir)
    weights, config_path = model_dir / ADAPTER_WEIGHTS, model_dir / ADAPTER_CONFIG
    if not weights.is_file() or not config_path.is_file():
        raise LmforgeError(f"{model_dir} has no {ADAPTER_WEIGHTS} and {ADAPTER_CONFIG}: it was not fine-tuned with "
                           "finetune.method=lora; export the whole model with --format hf instead.")
    config = GPTConfig.from_dict(json.loads((model_dir / "config.json").read_text(encoding="utf-8"))["model"])
    family = hf_family(config)
    modules = hf_modules(config, family)
    adapter_config = json.loads(config_path.read_text(encoding="utf-8"))
    tensors, targets = {}, set()
    for key, value in load_file(str(weights)).items():
        module, _, part = key.removeprefix(PREFIX).rpartition(".lora_")
        if not part or module not in modules:
            raise LmforgeError(f"{weights} holds {key}, which is not a LoRA adapter of a linear layer (the "
                               "embeddings trained too); export the merged model with --format hf instead.")
        names, rows, _ = modules[module]
        if part == "A.weight" or rows is None:
            pieces = [value] * len(names)
        else:
            pieces = value.split(rows)
        for name, piece in zip(names, pieces):
            tensors[f"{PREFIX}{name}.lora_{part}"] = piece.contiguous().clone()
            targets.add(name.rpartition(".")[2])
    if family == GPT2 and "lm_head" in targets:
        raise LmforgeError("an adapter on lm_head has no PEFT counterpart in GPT-2 (its other layers are Conv1D, "
                           "stored transposed); export the merged model with --format hf instead.")
    adapter_config.update({"target_modules": sorted(targets), "task_type": "CAUSAL_LM",
                           "fan_in_fan_out": family == GPT2})
    out = Path(out)
    with atomic_path(out, directory=True) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2) + "\n", encoding="utf-8")
    return out
