"""Which engine a stage runs on: ``data.engine``, ``data.workers`` and whether the work is worth a pool.

Every engine has the same face: ``map(items)`` gives ``function(item)`` for each item in input order,
``workers`` says how many run at once, ``in_process`` whether they run in the stage's own process,
and ``close()`` (or leaving its ``with`` block) stops what it started.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lmforge.engines.local import InProcess, ProcessPool
from lmforge.engines.ray import RayEngine  # Ray itself is imported only when a RayEngine opens
from lmforge.engines.workers import workers_of
from lmforge.errors import LmforgeError

ENGINES = ("local", "ray")


def engine_of(data_cfg) -> str:
    """``data.engine`` validated: ``local`` or ``ray``."""
    engine = str(data_cfg.get("engine") or "local")
    if engine not in ENGINES:
        raise LmforgeError(f"data.engine='{engine}' is not one of {', '.join(ENGINES)}.")
    return engine


def open_engine(data_cfg, function: Callable[[Any], Any], name: str, pool: bool = True):
    """The engine that runs ``function`` for the stage ``name``.

    ``data.engine=ray``: Ray tasks (``lmforge.engines.ray``, which imports Ray then). Otherwise a local pool
    of ``data.workers`` processes (default: every core) when ``pool`` is true (the stage's call: is the
    work big enough to pay for starting them?) and more than one worker is asked for, else this process.
    """
    if engine_of(data_cfg) == "ray":
        return RayEngine(function, data_cfg, name)
    workers = workers_of(data_cfg)
    if pool and workers > 1:
        return ProcessPool(function, workers)
    return InProcess(function)
