"""Lineage: the exact code and data behind a training run, as MLflow tags, and read back.

Each run is tagged with

    mlflow.source.git.commit   the commit the code came from (a queued experiment's baseline)
    lmforge.git_dirty          "true" when tracked files differed from that commit
    lmforge.dvc_experiment     the DVC experiment name (``dvc exp show``), when run by DVC
    lmforge.<data>.path/.md5   for corpus (prepare), tokenizer (vocab) and tokens (tokenize):
                               the directory and its DVC content hash, as in ``dvc.lock``
    lmforge.hashes_from        "dvc.lock", or "hashed" when the directories were hashed here

so that a run in the UI leads back to the bytes that produced it: ``dvc exp apply`` or
``git checkout <commit> && dvc checkout`` restores them, and the hashes say whether a directory
on disk is the same one. ``describe_run`` prints all of it (``lmforge runs show RUN_ID``).

A run continued after an interruption has several attempts: ``lmforge.tracking.attempts``.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import subprocess
from collections.abc import Iterator
from pathlib import Path

import yaml

from lmforge.errors import LmforgeError
from lmforge.tracking.attempts import ATTEMPTS_TAG, current_params

LOCK_FILE = Path("dvc.lock")
# What each stage's output is, in the words of the tags, and where the config names it.
DATA = {"corpus": "prepared", "tokenizer": "vocab", "tokens": "tokens"}
DVC_FILE = Path("dvc.yaml")
# Files DVC rewrites by design during `dvc exp run`, besides the outputs dvc.yaml declares.
_REWRITTEN_BY_DVC = {"params.yaml", "dvc.lock"}
# The params `runs show` prints as the run's summary (all of them are in the UI).
SUMMARY_PARAMS = ("seed", "tokenizer.kind", "tokenizer.vocab_size", "model.n_layer", "model.n_head", "model.n_embd",
                  "model.block_size", "optimizer.name", "optimizer.lr", "optimizer.schedule", "train.max_steps",
                  "train.batch_size", "trainer.precision")


def git_commit() -> str | None:
    """The commit the code came from: a queued experiment's baseline, else ``HEAD``; None outside git.

    A queued experiment runs on a temporary commit that carries its parameters; DVC names the
    commit the user queued it from in ``DVC_EXP_BASELINE_REV``.
    """
    return os.environ.get("DVC_EXP_BASELINE_REV") or _git("rev-parse", "HEAD")


def git_dirty() -> bool | None:
    """True when tracked files differ from ``HEAD``; None outside git.

    What DVC rewrites by design does not count: params.yaml, dvc.lock, every output dvc.yaml
    declares (outs, metrics, plots: ``reports/*.json`` and the like) and the entries DVC adds for
    them to a .gitignore (``dvc_managed_paths``).
    """
    changed = _git("diff", "--name-only", "-z", "HEAD")
    if changed is None:
        return None
    prefix = _git("rev-parse", "--show-prefix") or ""  # the project's folder inside the repository
    managed, ignored = dvc_managed_paths()
    managed = {prefix + path for path in managed}
    for path in filter(None, changed.split("\0")):
        if path in managed or any(path.startswith(m + "/") for m in managed):
            continue
        entries = ignored.get(path[len(prefix):] if path.startswith(prefix) else None)
        if entries is None or not _only_entries(path, entries):
            return True
    return False


def dvc_managed_paths(dvc_file: Path = DVC_FILE) -> tuple[set[str], dict[str, set[str]]]:
    """What DVC writes itself in a project: (paths, {.gitignore path: the entries DVC adds to it}).

    The paths are params.yaml, dvc.lock and every ``outs``, ``metrics`` and ``plots`` path of
    ``dvc_file``'s stages (relative to the project, ``wdir`` applied; templated ones are skipped).
    """
    paths, ignored = set(_REWRITTEN_BY_DVC), {}
    try:
        spec = yaml.safe_load(dvc_file.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return paths, ignored
    for stage in (spec.get("stages") or {}).values() if isinstance(spec, dict) else ():
        if not isinstance(stage, dict):
            continue
        for section in ("outs", "metrics", "plots"):
            for entry in stage.get(section) or []:
                out = entry if isinstance(entry, str) else next(iter(entry), None) if isinstance(entry, dict) else None
                if not isinstance(out, str) or "${" in out:
                    continue
                path = posixpath.normpath(posixpath.join(str(stage.get("wdir") or "."), out))
                paths.add(path)
                folder, name = posixpath.split(path)
                ignored.setdefault(posixpath.join(folder, ".gitignore"), set()).add(f"/{name}")
    return paths, ignored


def _only_entries(gitignore: str, entries: set[str]) -> bool:
    # True when every line added to or removed from this .gitignore since HEAD is one of DVC's entries.
    diff = _git("diff", "-U0", "HEAD", "--", f":(top){gitignore}") or ""
    lines = [line[1:].strip() for line in diff.splitlines()
             if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    return all(not line or line in entries for line in lines)


def dvc_experiment() -> str | None:
    """The DVC experiment name of this run (``DVC_EXP_NAME``, set by ``dvc exp run``), or None."""
    return os.environ.get("DVC_EXP_NAME") or None


def dir_md5(path: str | Path) -> str:
    """DVC's content hash of a directory (``<md5>.dir``, as ``dvc.lock`` records it).

    The md5 of the JSON list of ``{"md5": <file md5>, "relpath": <posix path>}`` sorted by path.
    """
    root = Path(path)
    entries = [{"md5": _file_md5(f), "relpath": f.relative_to(root).as_posix()} for f in _files(root)]
    entries.sort(key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode("utf-8")).hexdigest() + ".dir"


def data_hashes(cfg, lock_path: str | Path = LOCK_FILE) -> tuple[dict[str, dict[str, str]], str]:
    """The path and content hash of the corpus, tokenizer and token directories ``cfg.paths`` names.

    Returns ``({"corpus": {"path": ..., "md5": ...}, ...}, source)``. Under DVC (``DVC_STAGE`` is
    set) the upstream stages have run or been verified before this one, so their ``dvc.lock``
    entries are current: those are used when their size and file count match the directory, and
    ``source`` is ``"dvc.lock"``. A stage run by hand cannot trust the lock file (an upstream
    stage may have been rerun by hand too), so the directories are hashed (``"hashed"``; md5
    reads a few seconds per GB).
    """
    outs = _lock_outs(Path(lock_path)) if os.environ.get("DVC_STAGE") else {}
    hashes, hashed = {}, False
    for role, key in DATA.items():
        path = str(cfg.paths[key]).rstrip("/")
        entry = outs.get(Path(path).as_posix())
        if entry is not None and _matches(entry, Path(path)):
            md5 = entry["md5"]
        elif Path(path).is_dir():
            md5, hashed = dir_md5(path), True
        else:
            raise LmforgeError(f"{path} (paths.{key}) does not exist; run the stages before training (dvc repro).")
        hashes[role] = {"path": path, "md5": md5}
    return hashes, "hashed" if hashed else "dvc.lock"


def run_tags(cfg) -> dict[str, str]:
    """The lineage tags of a training run on config ``cfg`` (see the module docstring)."""
    tags: dict[str, str] = {}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["lmforge.git_dirty"] = str(git_dirty()).lower()
    if dvc_experiment():
        tags["lmforge.dvc_experiment"] = dvc_experiment()
    hashes, source = data_hashes(cfg)
    for role, entry in hashes.items():
        tags[f"lmforge.{role}.path"] = entry["path"]
        tags[f"lmforge.{role}.md5"] = entry["md5"]
    tags["lmforge.hashes_from"] = source
    return tags


def lineage_tag_keys() -> tuple[str, ...]:
    """Every tag ``run_tags`` may set (a continued run's new attempt deletes those it lacks)."""
    return ("mlflow.source.git.commit", "lmforge.git_dirty", "lmforge.dvc_experiment", "lmforge.hashes_from",
            *(f"lmforge.{role}.{part}" for role in DATA for part in ("path", "md5")))


def describe_run(run_id: str, tracking_uri: str) -> str:
    """A run's lineage, summary params and final metrics, as text (``lmforge runs show``)."""
    from lmforge.tracking.runs import check_reachable, quiet_mlflow_env

    quiet_mlflow_env()
    check_reachable(tracking_uri)
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        run = client.get_run(run_id)
        experiment = client.get_experiment(run.info.experiment_id)
    except MlflowException:
        raise LmforgeError(f"there is no run '{run_id}' in {tracking_uri}; "
                           "list the runs with `lmforge runs list`.") from None
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    lines = [f"run {run.info.run_id}  {run.info.run_name}  {run.info.status}  (experiment {experiment.name})",
             f"  artifacts        {run.info.artifact_uri}", "lineage"]
    commit = tags.get("mlflow.source.git.commit")
    if commit:
        dirty = {"true": "tracked files had changes", "false": "clean"}.get(tags.get("lmforge.git_dirty", ""), "?")
        lines.append(f"  git commit       {commit} ({dirty})")
    else:
        lines.append("  git commit       (not recorded: not run from a git repository)")
    lines.append(f"  dvc experiment   {tags.get('lmforge.dvc_experiment', '(none: not run by dvc exp run)')}")
    for role in DATA:
        if f"lmforge.{role}.md5" in tags:
            lines.append(f"  {role:16} {tags[f'lmforge.{role}.path']:16} md5 {tags[f'lmforge.{role}.md5']}")
        else:
            lines.append(f"  {role:16} (not recorded)")
    if "lmforge.hashes_from" in tags:
        lines.append(f"  hashes from      {tags['lmforge.hashes_from']}")
    if "lmforge.base.ref" in tags:  # a fine-tune: the base model it started from (finetune.base)
        at = f" at {tags['lmforge.base.revision']}" if tags.get("lmforge.base.revision") else ""
        lines.append(f"  base model       {tags['lmforge.base.ref']}{at} ({tags.get('lmforge.base.kind', '?')}, "
                     f"{tags.get('lmforge.base.source', '?')}; files sha256 {tags.get('lmforge.base.files_sha256')})")
    attempts = int(tags.get(ATTEMPTS_TAG, "1"))
    if attempts > 1:
        lines.append(f"attempts         {attempts} (the run was continued after an interruption)")
        lines.extend(f"  {n}: changed {tags.get(f'lmforge.attempt{n}.changed', '(not recorded)')}"
                     for n in range(2, attempts + 1))
    lines.append("params" + (" (as of the last attempt)" if attempts > 1 else ""))
    params = current_params(params)
    lines.extend(f"  {key:22} {params[key]}" for key in SUMMARY_PARAMS if key in params)
    lines.append("metrics (last value)")
    width = max((len(key) for key in metrics), default=0)
    lines.extend(f"  {key:{width}}  {value:.6g}" for key, value in sorted(metrics.items()))
    return "\n".join(lines)


def list_runs(tracking_uri: str, experiment: str, max_results: int = 20) -> str:
    """The newest runs of ``experiment`` as a table: id, name, DVC experiment, status, val loss."""
    from lmforge.tracking.runs import check_reachable, quiet_mlflow_env

    quiet_mlflow_env()
    check_reachable(tracking_uri)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise LmforgeError(f"there is no experiment '{experiment}' in {tracking_uri}; train a model first (dvc repro).")
    runs = client.search_runs([found.experiment_id], order_by=["attributes.start_time DESC"], max_results=max_results)
    rows = [("run id", "name", "dvc experiment", "status", "eval/val_loss")]
    for run in runs:
        loss = run.data.metrics.get("eval/val_loss")
        rows.append((run.info.run_id, run.info.run_name or "", run.data.tags.get("lmforge.dvc_experiment", ""),
                     run.info.status, "" if loss is None else f"{loss:.4f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def _lock_outs(lock_path: Path) -> dict[str, dict]:
    # Every stage's outs by path: {"data/prepared": {"md5": ..., "size": ..., "nfiles": ...}}.
    if not lock_path.is_file():
        return {}
    try:
        lock = yaml.safe_load(lock_path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        return {}  # hash the directories instead: the lock file is DVC's, not ours to judge
    outs = {}
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            if "path" in out and "md5" in out:
                outs[Path(out["path"]).as_posix()] = out
    return outs


def _matches(entry: dict, path: Path) -> bool:
    # A cheap guard against a lock entry for another version of the directory (e.g. `dvc repro -s`).
    if not path.is_dir():
        return False
    files = list(_files(path))
    return entry.get("nfiles") == len(files) and entry.get("size") == sum(f.stat().st_size for f in files)


def _files(root: Path) -> Iterator[Path]:
    return (f for f in sorted(root.rglob("*")) if f.is_file())


def _file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None
