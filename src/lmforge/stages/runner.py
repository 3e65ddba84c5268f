"""The pipeline's stage runner: ``pipelines/<stage>.py`` and ``lmforge <stage>`` read params.yaml
(plus ``key=value`` overrides), run the checks of what the stage reads, then the stage itself.

Kept apart from ``cli.py`` (the model tools' command line) so that DVC, which re-runs a stage
when a file it imports changes, does not re-run the pipeline for an edit to another subcommand.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

from lmforge.errors import LmforgeError


def stage_function(name: str) -> Callable:
    # Imported lazily: `lmforge generate` should not pay for importing the training stack.
    if name == "prepare":
        from lmforge.corpus.stage import prepare_stage as run
    elif name == "vocab":
        from lmforge.tokenization.vocab import vocab_stage as run
    elif name == "tokenize":
        from lmforge.tokenization.encode import tokenize_stage as run
    elif name == "train":
        from lmforge.tracking.runs import quiet_mlflow_env  # before MLflow is imported

        quiet_mlflow_env()
        from lmforge.training.stage import train_stage as run
    elif name == "evaluate":
        from lmforge.tracking.runs import quiet_mlflow_env

        quiet_mlflow_env()
        from lmforge.evaluation.stage import evaluate_stage as run
    elif name == "check":  # the DVC stage that runs on any parameter change (pipelines/check.py)
        from lmforge.stages.check import check_stage as run
    else:
        raise LmforgeError(f"unknown stage '{name}'; stages: {', '.join(STAGES)}.")
    return run


STAGES = ("prepare", "vocab", "tokenize", "train", "evaluate")


def run_stage(name: str, overrides: Sequence[str] | None = None) -> None:
    """Entry point of ``pipelines/<name>.py``: read params.yaml + overrides, run the stage."""
    overrides = sys.argv[1:] if overrides is None else overrides
    unshadow_standard_library()
    guarded(lambda: _run_stage(name, overrides))


def unshadow_standard_library() -> None:
    """Take the stage script's folder off ``sys.path`` when a file there hides a standard module.

    ``python pipelines/train.py`` puts ``pipelines/`` first on ``sys.path``, and its ``tokenize.py``
    hides the standard library's ``tokenize``: whatever imports that next (``linecache`` does, for
    the stack torch records as it imports with CUDA) got the stage script and failed with "module
    'tokenize' has no attribute 'open'". An environment whose start-up had already imported the real
    one (a ``.pth`` file of some package) hid this. The stage scripts import nothing from their folder.
    """
    if not (sys.argv and sys.argv[0] and sys.path and sys.path[0]):
        return
    folder = os.path.realpath(os.path.dirname(os.path.abspath(sys.argv[0])))
    if os.path.realpath(sys.path[0]) != folder or not os.path.isdir(folder):
        return
    hidden = {f.removesuffix(".py") for f in os.listdir(folder) if f.endswith(".py")} & sys.stdlib_module_names
    if not hidden:
        return
    del sys.path[0]
    for name in hidden:  # imported from the folder already: import the standard one next time
        module = sys.modules.get(name)
        if module is not None and os.path.realpath(os.path.dirname(getattr(module, "__file__", None) or "")) == folder:
            del sys.modules[name]


def _run_stage(name: str, overrides: Sequence[str]) -> None:
    from lmforge.config.compose import load_config, with_stale_params
    from lmforge.stages.check import check_config

    try:
        cfg = load_config(overrides)
        check_config(cfg, stage=name)  # what `lmforge check` checks, as far as this stage reads
        result = stage_function(name)(cfg)
    except LmforgeError as err:  # a value a failed `dvc exp run -S` left in params.yaml is named as such
        raise LmforgeError(with_stale_params(str(err), overrides)) from None
    if name == "evaluate" and isinstance(result, dict):
        print("  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))


def guarded(action: Callable[[], object]) -> None:
    try:
        action()
    except LmforgeError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as err:  # Ctrl-C: 130; SIGTERM after training saved a checkpoint: 143
        print("interrupted", file=sys.stderr)
        sys.exit(getattr(err, "exit_status", 130))
    except BrokenPipeError:  # `lmforge runs list | head`: the reader left, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
