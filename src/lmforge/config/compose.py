"""The configuration every stage reads: ``params.yaml`` (composed from ``conf/``) plus overrides.

``dvc exp run -S ...`` composes ``conf/`` with Hydra and rewrites ``params.yaml``; ``dvc repro``
does not compose, so stages read ``params.yaml``. A stage run by hand takes the same overrides:
``model=tiny`` swaps in the config group file ``conf/model/tiny.yaml`` and ``train.max_steps=50``
sets one key. Unknown keys and group choices end in an ``LmforgeError`` naming them.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from lmforge.errors import LmforgeError

PARAMS_FILE = Path("params.yaml")
CONF_DIR = Path("conf")
# A default no config value can be: tells "not there" from a key set to null.
UNSET = object()


def load_config(
    overrides: Iterable[str] = (),
    params_path: str | Path = PARAMS_FILE,
    conf_dir: str | Path = CONF_DIR,
) -> DictConfig:
    """Read ``params_path`` and apply ``key=value`` / ``group=choice`` overrides; return the config."""
    params_path = Path(params_path)
    if not params_path.is_file():
        raise LmforgeError(
            f"{params_path} not found in {Path.cwd()}; run from the project root "
            "(or compose it with `lmforge compose`)."
        )
    try:
        cfg = OmegaConf.create(yaml.safe_load(params_path.read_text(encoding="utf-8")) or {})
    except yaml.YAMLError as err:
        raise LmforgeError(f"{params_path} is not valid YAML ({err}); "
                           "fix it or recompose it with `lmforge compose`.") from None
    check_known_keys(cfg, Path(conf_dir), source=str(params_path))
    for override in overrides:
        apply_override(cfg, override, Path(conf_dir))
    return cfg


def check_known_keys(cfg: DictConfig, conf_dir: Path, source: str = "params.yaml") -> None:
    """Refuse keys that no file in ``conf/`` defines, at every level: a ``-S +optimizer.lrr=0.5``
    typo would otherwise train silently with the default. Skipped when ``conf/`` is not there."""
    known = known_keys(conf_dir)
    if known is None:
        return
    for key in flat_keys(cfg):
        # A key under a known leaf is allowed: a null leaf (``train.init_from``) may take a mapping.
        if key not in known and not any(key.startswith(k + ".") for k in known):
            raise LmforgeError(
                f"{source} has the key '{key}', which no file in {conf_dir}/ defines{nearest_keys(key, known)}; "
                "remove it (a `+key=value` override adds new keys) or add it to conf/."
            )


def known_keys(conf_dir: Path) -> set[str] | None:
    """Every dotted leaf key that ``conf/config.yaml`` or a config group file defines (group keys
    prefixed by the group's name), or None when ``conf/`` is not there."""
    root_file = conf_dir / "config.yaml"
    if not root_file.is_file():
        return None
    known = set(flat_keys(OmegaConf.create(yaml.safe_load(root_file.read_text(encoding="utf-8")) or {})))
    for group_dir in (p for p in conf_dir.iterdir() if p.is_dir()):
        for option in group_dir.glob("*.yaml"):
            body = yaml.safe_load(option.read_text(encoding="utf-8")) or {}
            # Only the group's own keys: the group's name alone must not admit any key below it.
            known.update(f"{group_dir.name}.{k}" for k in flat_keys(OmegaConf.create(body)))
    known.discard("defaults")
    return known


def nearest_keys(key: str, known: Iterable[str]) -> str:
    """`` (did you mean a, b?)`` with the valid keys nearest to ``key``, or the keys of its group."""
    known = sorted(known)
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    if not close:
        group = key.split(".", 1)[0] + "."
        close = [k for k in known if k.startswith(group)][:8]
        return f" (valid keys under {group[:-1]}: {', '.join(close)})" if close else ""
    return f" (did you mean {', '.join(close)}?)"


def compose_config(overrides: Iterable[str] = (), conf_dir: str | Path = CONF_DIR) -> DictConfig:
    """Compose ``conf/`` with Hydra exactly as ``dvc exp run`` does (defaults list plus overrides)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    conf_dir = Path(conf_dir).resolve()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base=None):
            cfg = compose(config_name="config", overrides=list(overrides))
    except HydraException as err:
        raise LmforgeError(f"cannot compose {conf_dir}: {err}".rstrip(".") + ".") from None
    return cfg


def write_params(cfg: DictConfig, path: str | Path = PARAMS_FILE) -> None:
    """Write ``cfg`` as ``params.yaml`` (atomically), in the form DVC's Hydra integration writes it."""
    from lmforge.outputs import write_text

    write_text(path, yaml.safe_dump(OmegaConf.to_container(cfg, resolve=True), sort_keys=False))


def apply_override(cfg: DictConfig, override: str, conf_dir: Path) -> None:
    """Apply one ``key=value`` override to ``cfg`` in place."""
    if "=" not in override:
        raise LmforgeError(f"override '{override}' is not of the form key=value (e.g. train.max_steps=50).")
    key, raw = override.split("=", 1)
    key = key.strip()
    value = _parse_value(key, raw)
    group_dir = conf_dir / key
    if "." not in key and group_dir.is_dir():
        cfg[key] = _load_group_choice(group_dir, key, str(raw).strip())
        return
    if OmegaConf.select(cfg, key, default=UNSET) is UNSET:
        raise LmforgeError(f"unknown config key '{key}'{nearest_keys(key, flat_keys(cfg))}; "
                           "see params.yaml for the valid keys.")
    old = OmegaConf.select(cfg, key)
    _check_type(key, old, value)
    OmegaConf.update(cfg, key, value, merge=False)


def _parse_value(key: str, raw: str) -> Any:
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        raise LmforgeError(f"the value given for '{key}' ({raw!r}) is not valid YAML; "
                           "quote it or fix the brackets.") from None
    if isinstance(value, str):
        # YAML 1.1 reads 3e-4 as a string; Hydra (and so `dvc exp run -S`) reads it as a float.
        for number in (int, float):
            try:
                return number(value)
            except ValueError:
                pass
    return value


def _load_group_choice(group_dir: Path, group: str, choice: str) -> Any:
    path = group_dir / f"{choice}.yaml"
    if not path.is_file():
        valid = ", ".join(sorted(p.stem for p in group_dir.glob("*.yaml")))
        raise LmforgeError(f"unknown choice '{choice}' for config group '{group}'; valid choices: {valid}.")
    return OmegaConf.create(yaml.safe_load(path.read_text(encoding="utf-8")) or {})


def _check_type(key: str, old: Any, new: Any) -> None:
    # A number where a number was, a list where a list was: catches `train.max_steps=abc` early.
    if old is None or new is None:
        return
    numeric = (int, float)
    if isinstance(old, bool) or isinstance(new, bool):
        ok = isinstance(old, bool) == isinstance(new, bool)
    elif isinstance(old, numeric):
        ok = isinstance(new, numeric) and not (isinstance(old, int) and isinstance(new, float) and not new.is_integer())
    elif OmegaConf.is_list(old) or isinstance(old, list):
        ok = isinstance(new, list)
    elif OmegaConf.is_dict(old) or isinstance(old, dict):
        ok = isinstance(new, dict)
    else:
        ok = True
    if not ok:
        raise LmforgeError(f"'{key}={new!r}' has the wrong type: "
                           f"expected {type(old).__name__} like the current value {old!r}.")


def flat_keys(cfg: Any) -> list[str]:
    """All dotted leaf keys of ``cfg`` (``train.max_steps``, ...), interpolations unresolved."""
    container = OmegaConf.to_container(cfg, resolve=False) if OmegaConf.is_config(cfg) else cfg
    return list(_flatten(container))


def flat_params(cfg: DictConfig) -> dict[str, Any]:
    """``cfg`` flattened to ``{"train.max_steps": 2000, ...}`` for experiment trackers."""
    return _flatten(OmegaConf.to_container(cfg, resolve=True))


def _flatten(node: dict, prefix: str = "", out: dict[str, Any] | None = None) -> dict[str, Any]:
    # An empty mapping is a leaf: it is a value a key was given, not a section.
    out = {} if out is None else out
    for key, value in node.items():
        if isinstance(value, dict) and value:
            _flatten(value, f"{prefix}{key}.", out)
        else:
            out[f"{prefix}{key}"] = value
    return out
