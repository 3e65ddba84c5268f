"""Where numbers reach MLflow: the tracking URI, the experiment, the run of each training
(``TrainingRun``: opened or continued, its status) and its metrics per step (``MetricsLog``).

The training stage opens the run; the evaluate stage logs its metrics and artifacts onto that
same run, found through the model directory's ``run.json``.

A relative store (``sqlite:///mlflow.db``) belongs to the project, not to the directory a stage
happens to run in: ``dvc exp run --queue`` runs each experiment in a temporary copy of the
repository (``.dvc/tmp/exps/...``) and sets ``DVC_ROOT`` to the original project, so relative
stores and their artifacts resolve against ``project_root()`` and every queued run lands in the
one store the user opens in the UI.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.tracking.attempts import next_attempt, param_value

ARTIFACT_DIR = "mlartifacts"


def quiet_mlflow_env() -> None:
    """Environment MLflow must see before it is imported: no telemetry calls to an outside host,
    and no download progress bars where stderr is not a terminal."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    if not sys.stderr.isatty():  # download progress bars are for a terminal, not a log file
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


# MLflow's set_tracking_uri and set_registry_uri (Lightning's logger calls the first) export these
# to the process environment, and so to every process started later.
_EXPORTED_BY_MLFLOW = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@contextlib.contextmanager
def environment_kept():
    """Run a block that points MLflow at one run's store, leaving the process environment as it
    was: a later command of the same process (a notebook, a test) keeps its own default store."""
    before = {key: os.environ.get(key) for key in _EXPORTED_BY_MLFLOW}
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def project_root() -> Path:
    """The project a stage belongs to: ``$DVC_ROOT`` under ``dvc repro``/``dvc exp run``, else cwd.

    DVC sets ``DVC_ROOT`` for every stage command; for a queued experiment it names the original
    repository, not the temporary copy the stage runs in.
    """
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def resolve_uri(uri: str, root: str | Path | None = None) -> str:
    """Make a relative ``sqlite:///x.db`` (or a plain path) absolute against ``root``.

    ``root`` defaults to ``project_root()``; absolute paths and server URIs come back unchanged.
    """
    root = Path(root or project_root()).resolve()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{(root / uri[len('sqlite:///'):]).resolve()}"
    if "://" not in uri:
        return (root / uri).resolve().as_uri()
    return uri


def artifact_root(uri: str) -> str | None:
    """Where a local store keeps artifacts: ``mlartifacts/`` beside its sqlite file; None for a server.

    A tracking server decides its own artifact root (``mlflow server --artifacts-destination``).
    """
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / ARTIFACT_DIR).as_uri()
    if uri.startswith("file:"):
        return (Path(urllib.parse.urlparse(uri).path).parent / ARTIFACT_DIR).as_uri()
    return None


def check_reachable(uri: str, timeout: float = 3.0) -> None:
    """Fail fast (seconds) with one sentence when an http(s) tracking server does not answer.

    MLflow's own client retries a dead server with backoff for minutes; this asks the server's
    ``/health`` once, with ``timeout``. Any answer below 500 counts as alive (a server behind
    authentication may answer 401). Local stores are not checked.
    """
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            return
    except urllib.error.HTTPError as err:
        if err.code < 500:
            return
        reason = f"it answered HTTP {err.code}"
    except (urllib.error.URLError, OSError) as err:
        cause = getattr(err, "reason", err)
        reason = getattr(cause, "strerror", None) or str(cause)
    raise LmforgeError(
        f"the MLflow tracking server {uri} is unreachable ({reason}); "
        "start it or set tracking.uri to a reachable server (or sqlite:///mlflow.db)."
    )


def ensure_experiment(uri: str, name: str) -> str:
    """Return the id of experiment ``name`` on ``uri``, creating it (artifacts: ``artifact_root(uri)``)."""
    quiet_mlflow_env()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    # Without an explicit location, artifacts of a local store land in ./mlruns of whatever
    # directory the stage runs in (a temporary one, for a queued experiment).
    return client.create_experiment(name, artifact_location=artifact_root(uri))


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

        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, step or 0) for k, v in metrics.items()])
    if params:
        from mlflow.entities import Param

        client.log_batch(run_id, params=[Param(k, param_value(v)) for k, v in params.items()])
    for path in artifacts or []:
        client.log_artifact(run_id, str(path))
    for dest, path in (artifact_dirs or {}).items():
        client.log_artifacts(run_id, str(path), artifact_path=dest)


def set_run_status(run: dict, status: str) -> None:
    """Mark the run of a ``run.json`` as RUNNING (resumed) or FINISHED, FAILED, KILLED (ended)."""
    quiet_mlflow_env()
    from mlflow.tracking import MlflowClient

    check_reachable(run["tracking_uri"])
    client = MlflowClient(tracking_uri=run["tracking_uri"])
    if status == "RUNNING":
        client.update_run(run["run_id"], status=status)
    else:
        client.set_terminated(run["run_id"], status=status)


class MetricsLog:
    """Metrics on their way to one MLflow run, written in one batch every ``FLUSH_SECONDS`` rather
    than one write per logged step (a SQLite store spends tens of milliseconds on each write; see
    benchmarks/train_throughput.py). The training flushes it before every checkpoint is written,
    so a resumed run misses no step, and when training ends or fails.

    ``logged`` holds the (metric, step) pairs a resumed run already has: they are not sent again,
    so MLflow keeps each step once (the first value; on a CPU the resumed run's is the same).
    """

    FLUSH_SECONDS = 10.0

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id
        self.pending: list[tuple[str, float, int, int]] = []  # key, value, step, timestamp (ms)
        self.logged: set[tuple[str, int]] = set()
        self._last_flush = time.monotonic()

    def add(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.pending += [(key, float(value), step, now) for key, value in metrics.items()
                         if (key, step) not in self.logged]
        if time.monotonic() - self._last_flush > self.FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        if not self.pending:
            return
        from mlflow.entities import Metric

        pending, self.pending = self.pending, []
        for start in range(0, len(pending), 1000):  # MLflow's limit per batch
            batch = pending[start : start + 1000]
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, ts, step) for k, v, step, ts in batch])


class TrainingRun:
    """The MLflow run of one training: opened new, or continued after an interruption; its
    parameters and first metrics, its metrics per step (``metrics``), and its status at the end.

    ``logger`` is the Lightning MLFlowLogger the Trainer writes through; ``info`` is what
    ``run.json`` files hold (tracking URI, experiment and run id).
    """

    def __init__(self, logger, resumed: bool):
        self.logger, self.resumed = logger, resumed
        self.info = {"tracking_uri": logger._tracking_uri, "experiment_id": logger.experiment_id,
                     "run_id": logger.run_id}
        self.metrics = MetricsLog(logger.experiment, logger.run_id)

    @classmethod
    def open(cls, tracking_cfg, run_name: str, tags: dict[str, str], record: dict | None) -> TrainingRun:
        """Continue the run ``record`` names (a checkpoint's ``run.json``) when it lives in the
        configured store; otherwise start a new run named ``run_name`` with ``tags``."""
        same_store = record is not None and record.get("tracking_uri") == resolve_uri(tracking_cfg.uri)
        logger = make_logger(tracking_cfg, run_name, run_id=record["run_id"] if same_store else None, tags=tags)
        with environment_kept():  # the logger's first use calls mlflow.set_tracking_uri
            run = cls(logger, resumed=same_store)
        if same_store:
            set_run_status(run.info, "RUNNING")
            run.metrics.logged = run.logged_metric_steps()
        return run

    def log_start(self, params: dict[str, Any], metrics: dict[str, float]) -> None:
        """A new run's parameters and its step-0 metrics (model size, corpus counts)."""
        self._log_params({key: param_value(value) for key, value in params.items()})
        self.logger.log_metrics(metrics, step=0)

    def record_attempt(self, params: dict[str, Any], tags: dict[str, str | None],
                       run_name: str) -> tuple[int, list[str]]:
        """A continued run's new attempt (``lmforge.tracking.attempts``): the settings that changed
        since the last one, this attempt's lineage ``tags`` (None for one it lacks) and its name.
        Returns the attempt's number and its changes (``key: old -> new``)."""
        from mlflow.entities import RunTag

        client, run_id = self.logger.experiment, self.logger.run_id
        logged = client.get_run(run_id)
        attempt = next_attempt(logged.data.params, logged.data.tags, logged.info.run_name, params, tags, run_name)
        self._log_params(attempt.params)
        client.log_batch(run_id, tags=[RunTag(key, value) for key, value in attempt.tags.items()])
        for key in attempt.deleted_tags:
            client.delete_tag(run_id, key)
        if run_name != logged.info.run_name:
            client.update_run(run_id, name=run_name)
        return attempt.number, attempt.changes

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(key, value) for key, value in params.items()]
        for start in range(0, len(items), 100):  # MLflow's limit per batch
            self.logger.experiment.log_batch(self.logger.run_id, params=items[start : start + 100])

    def logged_metric_steps(self) -> set[tuple[str, int]]:
        """The (metric, step) pairs the run already holds (steps past the last checkpoint may
        have been flushed before an interruption)."""
        client = self.logger.experiment
        keys = client.get_run(self.logger.run_id).data.metrics
        return {(key, m.step) for key in keys for m in client.get_metric_history(self.logger.run_id, key)}

    def set_status(self, status: str) -> None:
        set_run_status(self.info, status)


def reported_counts(reports_dir: str | Path) -> dict[str, float]:
    """The numbers in ``reports/prepare.json``, ``vocab.json`` and ``tokenize.json`` (when present), for
    MLflow. Keys are ``prepare/<count>``, ``vocab/<metric>`` and ``tokenize/<count>``, e.g.
    ``prepare/duplicates`` or, for chat records, ``tokenize/train_truncated``.
    """
    import json

    counts = {}
    for stage in ("prepare", "vocab", "tokenize"):
        path = Path(reports_dir) / f"{stage}.json"
        if path.is_file():
            for key, value in json.loads(path.read_text(encoding="utf-8")).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    counts[f"{stage}/{key}"] = value
    return counts


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else ``tracking.uri`` of ./params.yaml (the project's store)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if Path("params.yaml").is_file():
        from lmforge.config.compose import load_config

        return resolve_uri(load_config().tracking.uri)
    raise LmforgeError(
        "no MLflow tracking URI: pass --tracking-uri, set MLFLOW_TRACKING_URI, or run from the project root "
        "(its params.yaml names the store)."
    )
