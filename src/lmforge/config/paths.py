"""The one table of the pipeline's paths and file names: dvc.yaml, the stages and the checks use it.

``paths.*`` in ``conf/config.yaml`` say where each stage writes; under DVC they must be the outputs
that dvc.yaml declares (``DVC_OUTPUTS``, checked by ``config.checks.check_dvc_paths`` and kept equal
to dvc.yaml by ``tests/unit/test_paths.py``). The names below are those of the files inside them.
"""

from __future__ import annotations

# paths.<key> -> the literal output dvc.yaml declares for it.
DVC_OUTPUTS = {"prepared": "data/prepared", "vocab": "data/vocab", "tokens": "data/tokens",
               "model": "models/gpt", "checkpoints": "models/checkpoints", "reports": "reports"}

# paths.prepared: one UTF-8 text file per split, documents separated by the ASCII record separator
# (cleaning strips control characters, so it never occurs inside a document).
SPLITS = ("train", "val")
DOC_SEPARATOR = "\x1e"

# paths.vocab and every model directory: HuggingFace tokenizers' own format.
TOKENIZER_FILE = "tokenizer.json"

# Per-user answers of measurements that must not change between two runs on one machine
# (``trainer.num_threads: auto``): $LMFORGE_CACHE_DIR, else $XDG_CACHE_HOME/lmforge, else ~/.cache/lmforge.
CACHE_DIR_ENV = "LMFORGE_CACHE_DIR"
THREADS_CACHE_FILE = "threads.json"

# paths.vocab and model directories of a fine-tune: the base model they come from
# (``lmforge.interop.base``: its name, revision and file hashes).
BASE_FILE = "base.json"
# A LoRA fine-tune's model directory: its adapters, in PEFT's file names (``lmforge export --adapter``).
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
# paths.prepared for data.format=chat|prompt_completion: one JSON record per line per split, and
# records.json naming the format (written by lmforge.corpus.records; read by vocab and tokenize).
RECORD_FORMATS = ("chat", "prompt_completion")
RECORDS_META = "records.json"


def records_file(split: str) -> str:
    """The prepared file of ``split`` for records: ``train.jsonl`` / ``val.jsonl``."""
    return f"{split}.jsonl"
