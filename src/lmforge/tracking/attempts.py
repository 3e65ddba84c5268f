"""The attempts of one MLflow run: a training interrupted (Ctrl-C, a pre-emption) and continued with
``train.resume=auto`` is one run, finished by its last attempt, which may differ from the first in
its DVC experiment, its commit or its non-trajectory settings (threads, precision, ...).

How they are recorded. MLflow keeps a param's first value for good (logging another value for a
key is refused), and a run's tags can change. So:

- params: those of the attempt that started the run, plus, for each later attempt ``n``, a param
  ``attempt<n>/<key>`` holding the new value of every setting that changed (``current_params``
  reads the values in force at the end back, ``lmforge runs show`` prints them);
- tags: ``lmforge.attempts`` (how many) and ``lmforge.attempt<n>.changed`` (``key: old -> new; ...``,
  the lineage tags and the run name included), while the lineage tags themselves
  (``lmforge.tracking.lineage``) and the run name are set to those of the attempt that finished
  the run: the DVC experiment ``dvc exp show`` lists is the one the run is named after.

Nothing here talks to MLflow: ``TrainingRun.record_attempt`` logs what ``next_attempt`` returns.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ATTEMPTS_TAG = "lmforge.attempts"
MAX_PARAM_VALUE = 6000  # characters: MLflow's limit for a param's value
MAX_TAG_VALUE = 8000  # and a tag's
UNSET = "(unset)"
_ATTEMPT_PARAM = re.compile(r"attempt(\d+)/(.+)")


def param_value(value) -> str:
    """A setting as MLflow stores a param: its text, cut at MLflow's limit."""
    return str(value)[:MAX_PARAM_VALUE]


def current_params(params: dict[str, str]) -> dict[str, str]:
    """The settings in force at a run's last attempt, from its MLflow params: the first attempt's,
    each replaced by the ``attempt<n>/<key>`` of the latest attempt that changed it."""
    current = {key: value for key, value in params.items() if not _ATTEMPT_PARAM.fullmatch(key)}
    later = sorted((int(m[1]), m[2], value) for key, value in params.items() if (m := _ATTEMPT_PARAM.fullmatch(key)))
    current.update({key: value for _, key, value in later})
    return {key: value for key, value in current.items() if value != UNSET}


@dataclass
class Attempt:
    """What a continued run logs for its new attempt."""

    number: int
    params: dict[str, str]  # attempt<n>/<key>: the new value of each setting that changed
    tags: dict[str, str]  # the lineage tags that changed, the attempt count and this attempt's changes
    deleted_tags: list[str]  # lineage tags this attempt does not have
    changes: list[str]  # "key: old -> new", for people


def next_attempt(logged_params: dict[str, str], logged_tags: dict[str, str], logged_name: str | None,
                 params: dict, tags: dict[str, str | None], run_name: str) -> Attempt:
    """The attempt that continues a run holding ``logged_params``, ``logged_tags`` and the name
    ``logged_name`` (as MLflow returns them) with the flat settings ``params``, the lineage ``tags``
    (None for a lineage tag this attempt lacks: it is deleted) and ``run_name``."""
    number = int(logged_tags.get(ATTEMPTS_TAG, "1")) + 1
    before = current_params(logged_params)
    now = {key: param_value(value) for key, value in params.items()}
    changed = {key: now.get(key, UNSET) for key in sorted(set(now) | set(before))
               if now.get(key, UNSET) != before.get(key, UNSET)}
    changes = [f"{key}: {_short(before.get(key, UNSET))} -> {_short(value)}" for key, value in changed.items()]
    new_tags, deleted = {}, []
    for key, value in tags.items():
        if logged_tags.get(key) != value:
            changes.append(f"{key}: {logged_tags.get(key, '(none)')} -> {'(none)' if value is None else value}")
            if value is None:
                deleted.append(key)
            else:
                new_tags[key] = value
    if run_name != logged_name:
        changes.append(f"run name: {logged_name} -> {run_name}")
    new_tags[ATTEMPTS_TAG] = str(number)
    new_tags[f"lmforge.attempt{number}.changed"] = ("; ".join(changes) or "nothing")[:MAX_TAG_VALUE]
    return Attempt(number, {f"attempt{number}/{key}": value for key, value in changed.items()}, new_tags,
                   deleted, changes)


def _short(value: str, limit: int = 120) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."
