"""Where numbers reach MLflow: the tracking URI, the experiment, the run of each training.

The training stage opens the run; the evaluate stage logs its metrics and artifacts onto that
same run, found through the model directory's ``run.json``.
"""

from __future__ import annotations

import os
import socket
import urllib.parse
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError

ARTIFACT_DIR = "mlartifacts"


def quiet_mlflow_env() -> None:
    """Environment MLflow must see before it is imported: no telemetry calls to an outside host."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


def resolve_uri(uri: str, root: str | Path | None = None) -> str:
    """Make a relative ``sqlite:///x.db`` (or a plain path) absolute against ``root`` (default: cwd)."""
    root = Path(root or Path.cwd()).resolve()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{(root / uri[len('sqlite:///'):]).resolve()}"
    if "://" not in uri:
        return (root / uri).resolve().as_uri()
    return uri


def check_reachable(uri: str, timeout: float = 3.0) -> None:
    """Fail fast (seconds) with one sentence when an http(s) tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    parsed = urllib.parse.urlparse(uri)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            pass
    except OSError as err:
        raise LmforgeError(
            f"the MLflow tracking server {uri} is unreachable ({err.strerror or err}); "
            "start it or set tracking.uri to a reachable server (or sqlite:///mlflow.db)."
        ) from None


def ensure_experiment(uri: str, name: str, root: str | Path | None = None) -> str:
    """Return the id of experiment ``name`` on ``uri``, creating it with a project-local artifact root."""
    quiet_mlflow_env()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:"):
        # Without this, artifacts land in ./mlruns of whatever directory the stage runs in.
        artifact_location = (Path(root or Path.cwd()).resolve() / ARTIFACT_DIR).as_uri()
    return client.create_experiment(name, artifact_location=artifact_location)


def make_logger(tracking_cfg, run_name: str, run_id: str | None = None, tags: dict[str, str] | None = None):
    """A Lightning MLFlowLogger on the configured store (URI passed explicitly, never ./mlruns)."""
    quiet_mlflow_env()
    from lightning.pytorch.loggers import MLFlowLogger

    uri = resolve_uri(tracking_cfg.uri)
    check_reachable(uri)
    ensure_experiment(uri, tracking_cfg.experiment)
    return MLFlowLogger(
        experiment_name=tracking_cfg.experiment,
        run_name=run_name,
        tracking_uri=uri,
        tags=tags,
        log_model=False,
        run_id=run_id,
    )


def log_to_run(run: dict, metrics: dict[str, float] | None = None, artifacts: list[Path] | None = None,
               artifact_dirs: dict[str, Path] | None = None, step: int | None = None,
               params: dict[str, Any] | None = None) -> None:
    """Log metrics and artifacts onto an existing run described by a model's ``run.json``."""
    quiet_mlflow_env()
    from mlflow.tracking import MlflowClient

    check_reachable(run["tracking_uri"])
    client = MlflowClient(tracking_uri=run["tracking_uri"])
    run_id = run["run_id"]
    if metrics:
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, step or 0) for k, v in metrics.items()])
    if params:
        from mlflow.entities import Param

        client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    for path in artifacts or []:
        client.log_artifact(run_id, str(path))
    for dest, path in (artifact_dirs or {}).items():
        client.log_artifacts(run_id, str(path), artifact_path=dest)
