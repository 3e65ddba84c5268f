"""The configuration every stage reads: ``params.yaml`` (composed from ``conf/``) plus overrides.

``dvc exp run -S ...`` composes ``conf/`` with Hydra and rewrites ``params.yaml``; ``dvc repro``
does not compose, so stages read ``params.yaml``. A stage run by hand takes the same overrides:
``model=tiny`` swaps in the config group file ``conf/model/tiny.yaml`` and ``train.max_steps=50``
sets one key. Unknown keys and group choices end in an ``LmforgeError`` naming them.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from lmforge.config.rules import RULES, check_setting, names
from lmforge.config.values import kind_name, same_kind
from lmforge.errors import LmforgeError

PARAMS_FILE = Path("params.yaml")
CONF_DIR = Path("conf")
# A default no config value can be: tells "not there" from a key set to null.
UNSET = object()
# A config group whose files say this on their first line (``conf/experiment/``) sets keys at the top
# level, as Hydra's ``@package _global_`` does: it is not a key of the composed config.
GLOBAL_PACKAGE = "# @package _global_"
# List keys that also take a single string, read as a list of one (``data.sources=corpus/books``).
ONE_OR_MANY = ("data.sources",)


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
    return one_or_many(cfg)


def one_or_many(cfg: DictConfig) -> DictConfig:
    """``cfg`` with each ``ONE_OR_MANY`` key that holds one string made a list of it, in place:
    ``dvc exp run -S data.sources=corpus/books`` writes a string into params.yaml."""
    for key in ONE_OR_MANY:
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, str):
            OmegaConf.update(cfg, key, [value], merge=False)
    return cfg


def check_known_keys(cfg: DictConfig, conf_dir: Path, source: str = "params.yaml") -> None:
    """Refuse keys that no file in ``conf/`` defines, at every level: a ``-S +optimizer.lrr=0.5``
    typo would otherwise train silently with the default. Skipped when ``conf/`` is not there."""
    known = known_keys(conf_dir)
    if known is None:
        return
    for key in flat_keys(cfg):
        if not _is_known(key, known):
            raise LmforgeError(
                f"{source} has the key '{key}', which no file in {conf_dir}/ defines{nearest_keys(key, known)}; "
                "remove it (a `+key=value` override adds new keys) or add it to conf/."
            )


def known_keys(conf_dir: Path) -> set[str] | None:
    """Every dotted leaf key that ``conf/config.yaml`` or a config group file defines (group keys
    prefixed by the group's name), or None when ``conf/`` is not there."""
    files = conf_files(Path(conf_dir))
    if files is None:
        return None
    # Only a group file's own keys: the group's name alone must not admit any key below it.
    known = {prefix + key for prefix, body in files for key in flat_items(body)}
    known.discard("defaults")
    return known


def conf_files(conf_dir: Path) -> list[tuple[str, dict]] | None:
    """The files of ``conf_dir`` as (key prefix, parsed body): ``("", config.yaml)``, then
    ``("model.", conf/model/tiny.yaml)`` and so on; None when there is no ``config.yaml``. Parsed
    once per version of the files: every check and every override asks."""
    root = conf_dir / "config.yaml"
    if not root.is_file():
        return None
    paths = [root, *sorted(conf_dir.glob("*/*.yaml"))]
    signature = tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in paths)
    return _parsed(signature)


@functools.lru_cache(maxsize=8)
def _parsed(signature: tuple[tuple[str, int, int], ...]) -> list[tuple[str, dict]]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser where PyYAML has it
    files = []
    for number, (path, _, _) in enumerate(signature):
        text = Path(path).read_text(encoding="utf-8")
        body = yaml.load(text, Loader=loader) or {}
        if number and isinstance(body, dict):
            body.pop("defaults", None)  # an experiment's `override /group: choice` lines
        top = number == 0 or text.startswith(GLOBAL_PACKAGE)
        files.append(("" if top else Path(path).parent.name + ".", body))
    return files


def is_global_group(group_dir: Path) -> bool:
    """Whether the config group ``group_dir`` sets top-level keys (``# @package _global_``): an
    experiment, which the composed config holds no key for."""
    return any(p.read_text(encoding="utf-8").startswith(GLOBAL_PACKAGE) for p in Path(group_dir).glob("*.yaml"))


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
    overrides = list(overrides)
    for override in overrides:
        _check_hydra_override(override, conf_dir)
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base=None):
            cfg = compose(config_name="config", overrides=overrides)
    except HydraException as err:
        given = f" with {' '.join(overrides)}" if overrides else ""
        raise LmforgeError(f"cannot compose {conf_dir}{given}: {one_line(str(err))}") from None
    return one_or_many(cfg)


def one_line(hydra_message: str) -> str:
    """A Hydra error as one sentence: its own lines joined, without the config search path it appends."""
    kept = []
    for line in hydra_message.strip().splitlines():
        if line.startswith(("Config search path", "Available options")):
            break
        if line.strip():
            kept.append(line.strip().rstrip("."))
    return "; ".join(kept) + "."


def _check_hydra_override(override: str, conf_dir: Path) -> None:
    """Refuse what Hydra would refuse with a page of text, in the stages' own sentence: a group
    choice with no file, a key that no file of ``conf/`` defines (``+key=value`` adds one)."""
    key, sep, choice = override.partition("=")
    if not sep or key.startswith(("~", "+")):
        return  # Hydra's own message (made one line) for anything else
    key = key.strip()
    if "." not in key and (conf_dir / key).is_dir():
        group_choice_file(conf_dir / key, key, choice.strip())
    elif (known := known_keys(conf_dir)) is not None and not _is_known(key, known):
        raise LmforgeError(_unknown_key(key, known))


def _is_known(key: str, known: set[str]) -> bool:
    # A key under a known leaf is allowed: a null leaf (``train.init_from``) may take a mapping.
    return key in known or any(key.startswith(k + ".") for k in known)


def with_stale_params(message: str, overrides: Iterable[str] = (), params_path: str | Path = PARAMS_FILE,
                      conf_dir: str | Path = CONF_DIR) -> str:
    """The error ``message``, saying so when a key it names has a value in ``params_path`` that
    ``conf/`` does not compose to (and no override of ``overrides`` set): a ``dvc exp run -S`` that
    failed leaves its overrides in params.yaml, where ``dvc repro`` and every stage run by hand read
    them. ``message`` unchanged when it names no such key (or there is no ``conf/`` to compare with)."""
    if not (Path(conf_dir) / "config.yaml").is_file() or not Path(params_path).is_file():
        return message
    try:
        params = flat_params(OmegaConf.create(yaml.safe_load(Path(params_path).read_text(encoding="utf-8")) or {}))
        composed = flat_params(compose_config(conf_dir=conf_dir))
    except (LmforgeError, yaml.YAMLError, ValueError):
        return message
    overridden = {o.split("=", 1)[0].lstrip("+").strip() for o in overrides}
    stale = [key for key, value in params.items()
             if composed.get(key, UNSET) != value and names(message, key)
             and not any(key == o or key.startswith(o + ".") for o in overridden)]
    if not stale:
        return message
    key = stale[0]
    given = f"conf/ gives {composed[key]!r}" if key in composed else "conf/ has no such key"
    hint = (f"params.yaml sets {key}={params[key]!r} where {given}: a failed `dvc exp run -S` leaves its overrides "
            "in params.yaml, so restore it with `git checkout params.yaml` or `lmforge compose`.")
    return f"{message}\n{hint}" if "\n" in message else f"{message.rstrip('.')}; {hint}"


def write_params(cfg: DictConfig, path: str | Path = PARAMS_FILE) -> None:
    """Write ``cfg`` as ``params.yaml`` (atomically), in the form DVC's Hydra integration writes it."""
    from lmforge.outputs import write_text

    write_text(path, yaml.safe_dump(OmegaConf.to_container(cfg, resolve=True), sort_keys=False))


def apply_override(cfg: DictConfig, override: str, conf_dir: Path) -> None:
    """Apply one ``key=value`` override to ``cfg`` in place (``+key=value`` adds a key, which the
    checks then refuse unless ``conf/`` defines it, as ``lmforge check +key=value`` does)."""
    if "=" not in override:
        raise LmforgeError(f"override '{override}' is not of the form key=value (e.g. train.max_steps=50).")
    key, raw = override.split("=", 1)
    adding = key.startswith("+")
    key = key.lstrip("+").strip()
    value = _parse_value(key, raw)
    group_dir = conf_dir / key
    if "." not in key and group_dir.is_dir() and is_global_group(group_dir):
        _apply_experiment(cfg, group_dir, key, str(raw).strip(), conf_dir)
        return
    if "." not in key and group_dir.is_dir():
        cfg[key] = _load_group_choice(group_dir, key, str(raw).strip())
        return
    if key in ONE_OR_MANY and isinstance(value, str):
        value = [value]
    if not adding and OmegaConf.select(cfg, key, default=UNSET) is UNSET:
        raise LmforgeError(_unknown_key(key, known_keys(conf_dir) or flat_keys(cfg)))
    if key in RULES:  # the range table judges its keys, in the sentence `lmforge check` gives
        check_setting(key, value)
    else:
        old = OmegaConf.select(cfg, key, default=None)
        if not same_kind(value, old):
            raise LmforgeError(f"{key}={value!r} has the wrong type: expected {kind_name(old)} "
                               f"like the current value {old!r}.")
    OmegaConf.update(cfg, key, value, merge=False)


def _unknown_key(key: str, known: Iterable[str]) -> str:
    return f"unknown config key '{key}'{nearest_keys(key, known)}; see params.yaml for the valid keys."


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


def group_choice_file(group_dir: Path, group: str, choice: str) -> Path:
    """``conf/<group>/<choice>.yaml``; LmforgeError naming the valid choices when there is none.
    The one sentence for a bad group choice, whether a stage, ``lmforge check`` or ``compose`` meets it."""
    path = group_dir / f"{choice}.yaml"
    if not path.is_file():
        valid = ", ".join(sorted(p.stem for p in group_dir.glob("*.yaml")))
        raise LmforgeError(f"unknown choice '{choice}' for config group '{group}'; valid choices: {valid}.")
    return path


def _apply_experiment(cfg: DictConfig, group_dir: Path, group: str, choice: str, conf_dir: Path) -> None:
    """``experiment=<choice>`` on a composed config: its ``override /group: choice`` defaults, then
    its keys over the rest, as Hydra composes it last in the defaults list."""
    body = OmegaConf.to_container(_load_group_choice(group_dir, group, choice))
    for entry in body.pop("defaults", None) or []:
        for name, value in (entry.items() if isinstance(entry, dict) else ()):
            apply_override(cfg, f"{name.removeprefix('override').strip().lstrip('/')}={value}", conf_dir)
    for key, value in flat_items(body).items():
        apply_override(cfg, f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}", conf_dir)


def _load_group_choice(group_dir: Path, group: str, choice: str) -> Any:
    path = group_choice_file(group_dir, group, choice)
    return OmegaConf.create(yaml.safe_load(path.read_text(encoding="utf-8")) or {})


def flat_keys(cfg: Any) -> list[str]:
    """All dotted leaf keys of ``cfg`` (``train.max_steps``, ...), interpolations unresolved."""
    container = OmegaConf.to_container(cfg, resolve=False) if OmegaConf.is_config(cfg) else cfg
    return list(flat_items(container))


def flat_params(cfg: DictConfig) -> dict[str, Any]:
    """``cfg`` flattened to ``{"train.max_steps": 2000, ...}`` for experiment trackers."""
    return flat_items(OmegaConf.to_container(cfg, resolve=True))


def flat_items(node: dict, prefix: str = "", out: dict[str, Any] | None = None) -> dict[str, Any]:
    """A plain nested mapping flattened to dotted keys; an empty mapping is a leaf (a value a key
    was given, not a section)."""
    out = {} if out is None else out
    for key, value in node.items():
        if isinstance(value, dict) and value:
            flat_items(value, f"{prefix}{key}.", out)
        else:
            out[f"{prefix}{key}"] = value
    return out
