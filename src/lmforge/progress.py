"""How progress reaches a person: a bar when someone watches a terminal, plain lines elsewhere.

``make run > log``, a queued ``dvc exp`` and CI get no bar (bars redraw with carriage returns);
the train stage writes plain progress lines there instead (``training.callbacks.ProgressLines``):

    step 750/2000 (38%)  train loss 1.6012  val loss 1.6403  14,210 tokens/s  elapsed 1m02s  ETA 1m43s
"""

from __future__ import annotations

import os
import sys


def watched() -> bool:
    """True when stderr is a terminal and ``CI`` is unset: progress bars then, plain lines otherwise."""
    return sys.stderr.isatty() and not os.environ.get("CI")


def duration(seconds: float) -> str:
    """``seconds`` as ``45s``, ``3m07s`` or ``1h02m``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
