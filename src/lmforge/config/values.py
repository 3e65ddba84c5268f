"""The type rules of a setting's value, shared by every check (config, model, sampling, the API).

``same_kind`` is the one rule for "is this value of the type that one is": a ``key=value``
override against the value it replaces (``config.compose``) and a composed value against the
values the files of ``conf/`` give its key (``config.checks``) both ask it.
"""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf


def is_int(value: Any) -> bool:
    """An int that is not a bool (YAML's ``true`` must not pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_list(value: Any) -> bool:
    """A list, a tuple or an OmegaConf ListConfig."""
    return isinstance(value, (list, tuple)) or OmegaConf.is_list(value)


def is_mapping(value: Any) -> bool:
    """A dict or an OmegaConf DictConfig."""
    return isinstance(value, dict) or OmegaConf.is_dict(value)


def same_kind(value: Any, example: Any) -> bool:
    """Whether ``value`` may stand where ``example`` stands: a bool for a bool, a number for a
    number (a float key takes an int, ``lr=1``; an int key takes no fraction, ``0.5``), a list for
    a list, a mapping for a mapping. A string key takes any scalar: Hydra reads
    ``trainer.precision=32`` as the number 32. None on either side is no evidence either way."""
    if value is None or example is None:
        return True
    if isinstance(example, bool) or isinstance(value, bool):
        return isinstance(example, bool) and isinstance(value, bool)
    if is_number(example):
        return is_number(value) and (isinstance(example, float) or is_int(value) or float(value).is_integer())
    if is_list(example):
        return is_list(value)
    if is_mapping(example):
        return is_mapping(value)
    return not (is_list(value) or is_mapping(value))


def kind_name(example: Any) -> str:
    """The name a message gives the type of ``example``: int, float, bool, str, list or mapping."""
    if is_list(example):
        return "list"
    if is_mapping(example):
        return "mapping"
    return type(example).__name__
