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
