"""Tracking and lineage: where the store is, failing fast on a dead server, the lineage tags of a
run and `lmforge runs`, and the Markdown report the evaluate stage logs."""

from __future__ import annotations

import http.server
import inspect
import os
import sys
import threading
from pathlib import Path

import pytest
import yaml

from lmforge.errors import LmforgeError
from lmforge.tracking import lineage
from lmforge.tracking import runs as tracking
from tests.helpers import ROOT, free_port, run_command, write_corpus


@pytest.fixture(autouse=True)
def outside_dvc(monkeypatch):
    """Tests start as if run by hand, whatever runs pytest."""
    for name in ("DVC_ROOT", "DVC_STAGE", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(name, raising=False)


# --- Where the store is ---

def test_a_relative_store_belongs_to_the_dvc_project_not_to_the_temporary_copy(tmp_path, monkeypatch):
    project = tmp_path / "project"
    queued_copy = project / ".dvc/tmp/exps/tmpabc123"  # where `dvc queue start` runs a stage
    queued_copy.mkdir(parents=True)
    monkeypatch.chdir(queued_copy)
    assert tracking.resolve_uri("sqlite:///mlflow.db") == f"sqlite:///{queued_copy}/mlflow.db"
    monkeypatch.setenv("DVC_ROOT", str(project))  # what DVC sets for a queued experiment's stages
    uri = tracking.resolve_uri("sqlite:///mlflow.db")
    assert uri == f"sqlite:///{project}/mlflow.db"
    assert tracking.artifact_root(uri) == (project / "mlartifacts").as_uri()


def test_absolute_stores_and_servers_are_kept(tmp_path):
    assert tracking.resolve_uri(f"sqlite:///{tmp_path}/x.db") == f"sqlite:///{tmp_path}/x.db"
    assert tracking.resolve_uri("http://mlflow.internal:5000") == "http://mlflow.internal:5000"
    assert tracking.artifact_root(f"sqlite:///{tmp_path}/x.db") == (tmp_path / "mlartifacts").as_uri()
    assert tracking.artifact_root("http://mlflow.internal:5000") is None  # the server decides


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One sqlite MLflow store for the module (creating its tables takes seconds)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"
    tracking.ensure_experiment(uri, "lmforge")
    return uri


def test_a_new_experiment_keeps_its_artifacts_beside_the_store(store, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # not where the store is
    experiment_id = tracking.ensure_experiment(store, "artifacts-here")
    assert tracking.ensure_experiment(store, "artifacts-here") == experiment_id
    location = MlflowClient(tracking_uri=store).get_experiment(experiment_id).artifact_location
    assert location == (Path(store[len("sqlite:///"):]).parent / "mlartifacts").as_uri()


# --- A dead tracking server fails in seconds, naming the URI ---

@pytest.fixture
def health_requests(monkeypatch) -> list[tuple[str, float]]:
    """Every (URL, timeout) that lmforge's health check asks urllib for, passed on to the real urlopen.

    What makes a dead server fail in seconds is this: one request, with a timeout of seconds, before
    MLflow's own client (which retries with backoff for minutes) is asked anything. Tests assert
    that, not the wall time, which a busy machine stretches."""
    import urllib.request

    asked, real = [], urllib.request.urlopen

    def urlopen(url, *args, timeout=None, **kwargs):
        asked.append((url if isinstance(url, str) else url.full_url, timeout))
        return real(url, *args, timeout=timeout, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return asked


HEALTH_TIMEOUT = inspect.signature(tracking.check_reachable).parameters["timeout"].default


def test_the_health_check_waits_seconds_not_minutes():
    assert 0 < HEALTH_TIMEOUT <= 5


def test_a_closed_port_fails_at_once_naming_the_uri(health_requests):
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(LmforgeError, match=f"MLflow tracking server {uri} is unreachable"):
        tracking.check_reachable(uri)
    assert health_requests == [(f"{uri}/health", HEALTH_TIMEOUT)]  # one request, no retry


@pytest.mark.parametrize("status, alive", [(200, True), (401, True), (503, False)])
def test_a_server_is_alive_when_it_answers_below_500(status, alive):
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        if alive:
            tracking.check_reachable(uri)
        else:
            with pytest.raises(LmforgeError, match=f"{uri} is unreachable \\(it answered HTTP 503\\)"):
                tracking.check_reachable(uri)
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
def test_the_train_stage_fails_fast_on_an_unreachable_server_and_writes_no_model(tiny_cfg, tmp_path, monkeypatch,
                                                                                 health_requests):
    from lmforge.config.compose import write_params
    from lmforge.corpus.stage import prepare_stage
    from lmforge.tokenization.encode import tokenize_stage
    from lmforge.tokenization.vocab import vocab_stage
    from lmforge.training.stage import train_stage

    tiny_cfg.data.sources = [str(write_corpus(tmp_path / "corpus", n_docs=12, words=300))]
    prepare_stage(tiny_cfg)
    vocab_stage(tiny_cfg)
    tokenize_stage(tiny_cfg)
    write_params(tiny_cfg)
    uri = f"http://127.0.0.1:{free_port()}"

    mlflow_asked = []  # MLflow's client retries a dead server for minutes: it must not be asked at all
    monkeypatch.setattr(tracking, "ensure_experiment", lambda *args: mlflow_asked.append(args))
    tiny_cfg.tracking.uri = uri
    with pytest.raises(LmforgeError, match=f"{uri} is unreachable"):
        train_stage(tiny_cfg)
    assert health_requests == [(f"{uri}/health", HEALTH_TIMEOUT)] and mlflow_asked == []

    # The stage script: one line, exit 1 (run_command's own timeout only guards against a hang).
    proc = run_command([sys.executable, str(ROOT / "pipelines/train.py"), f"tracking.uri={uri}"], tmp_path, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: the MLflow tracking server {uri} is unreachable")
    assert "Traceback" not in proc.stderr
    models = Path(tiny_cfg.paths.model).parent
    assert not Path(tiny_cfg.paths.model).exists()
    assert not (models.exists() and list(models.glob(".*")))  # no temporary half-written copy either


# --- Lineage ---

def test_dir_md5_is_the_hash_dvc_records(tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.txt").write_text("alpha\n")
    (data / "sub/b.bin").write_bytes(bytes(range(256)) * 10)
    run_command(["dvc", "init", "--no-scm", "-q"], tmp_path)
    run_command(["dvc", "add", "-q", "data"], tmp_path)
    recorded = yaml.safe_load((tmp_path / "data.dvc").read_text())["outs"][0]["md5"]
    assert lineage.dir_md5(data) == recorded


def _lock_with(cfg, md5s: dict[str, str], sizes: dict[str, int] | None = None) -> None:
    outs = []
    for role, key in lineage.DATA.items():
        path = Path(cfg.paths[key])
        files = [f for f in path.rglob("*") if f.is_file()]
        size = (sizes or {}).get(role, sum(f.stat().st_size for f in files))
        outs.append({"path": cfg.paths[key], "hash": "md5", "md5": md5s[role], "size": size, "nfiles": len(files)})
    Path("dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"s": {"cmd": "x", "outs": outs}}}))


@pytest.fixture
def data_dirs(tiny_cfg):
    for role, key in lineage.DATA.items():
        Path(tiny_cfg.paths[key]).mkdir(parents=True)
        Path(tiny_cfg.paths[key], f"{role}.txt").write_text(f"{role} bytes\n")
    return tiny_cfg


def test_under_dvc_the_hashes_come_from_dvc_lock(data_dirs, monkeypatch):
    _lock_with(data_dirs, {"corpus": "c.dir", "tokenizer": "v.dir", "tokens": "t.dir"})
    monkeypatch.setenv("DVC_STAGE", "train")
    hashes, source = lineage.data_hashes(data_dirs)
    assert source == "dvc.lock"
    assert {role: h["md5"] for role, h in hashes.items()} == {"corpus": "c.dir", "tokenizer": "v.dir",
                                                               "tokens": "t.dir"}
    assert hashes["tokens"]["path"] == data_dirs.paths.tokens


def test_a_lock_entry_for_other_bytes_or_a_stage_run_by_hand_hashes_the_directories(data_dirs, monkeypatch):
    real = {role: lineage.dir_md5(data_dirs.paths[key]) for role, key in lineage.DATA.items()}
    _lock_with(data_dirs, {"corpus": "c.dir", "tokenizer": "v.dir", "tokens": "t.dir"}, sizes={"tokens": 1})
    monkeypatch.setenv("DVC_STAGE", "train")
    hashes, source = lineage.data_hashes(data_dirs)
    assert source == "hashed" and hashes["tokens"]["md5"] == real["tokens"] and hashes["corpus"]["md5"] == "c.dir"
    monkeypatch.delenv("DVC_STAGE")
    hashes, source = lineage.data_hashes(data_dirs)
    assert source == "hashed" and {role: h["md5"] for role, h in hashes.items()} == real


def test_missing_data_names_the_directory(data_dirs):
    import shutil

    shutil.rmtree(data_dirs.paths.tokens)
    with pytest.raises(LmforgeError, match="paths.tokens"):
        lineage.data_hashes(data_dirs)


def test_run_tags_name_the_commit_its_state_the_experiment_and_the_data(data_dirs, monkeypatch):
    run_command(["git", "init", "-q"], Path.cwd())
    Path("code.py").write_text("print('v1')\n")
    Path("params.yaml").write_text("a: 1\n")
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    run_command(["git", "add", "code.py", "params.yaml"], Path.cwd())
    run_command(["git", "commit", "-qm", "v1"], Path.cwd(), env=env)
    head = run_command(["git", "rev-parse", "HEAD"], Path.cwd()).stdout.strip()

    Path("params.yaml").write_text("a: 2\n")  # DVC rewrites it on every `dvc exp run`: not a code change
    tags = lineage.run_tags(data_dirs)
    assert tags["mlflow.source.git.commit"] == head and tags["lmforge.git_dirty"] == "false"
    assert "lmforge.dvc_experiment" not in tags
    assert tags["lmforge.corpus.md5"] == lineage.dir_md5(data_dirs.paths.prepared)
    assert tags["lmforge.tokenizer.path"] == data_dirs.paths.vocab and tags["lmforge.hashes_from"] == "hashed"

    Path("code.py").write_text("print('v2')\n")
    monkeypatch.setenv("DVC_EXP_NAME", "sappy-bice")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "0" * 40)  # a queued run: the commit it was queued from
    tags = lineage.run_tags(data_dirs)
    assert tags["lmforge.git_dirty"] == "true"
    assert tags["lmforge.dvc_experiment"] == "sappy-bice" and tags["mlflow.source.git.commit"] == "0" * 40


def test_outputs_dvc_writes_do_not_make_a_run_dirty_but_code_does(tmp_path, monkeypatch):
    # `dvc exp run` rewrites reports/*.json (metrics, cache: false: committed with git), dvc.lock,
    # params.yaml and the .gitignore entries of its outputs: none of it is a change to the code.
    # The project lives in a folder of a larger repository, as `dvc init --subdir` makes it.
    project = tmp_path / "repo" / "project"
    (project / "reports").mkdir(parents=True)
    (project / "data").mkdir()
    monkeypatch.chdir(project)
    (project / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    files = {"reports/metrics.json": "{}", "reports/check.json": "{}", "reports/plots/val_loss.csv": "step\n",
             "params.yaml": "a: 1\n", "dvc.lock": "schema: '2.0'\n", "data/.gitignore": "/prepared\n",
             "code.py": "print(1)\n"}
    for name, text in files.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(text)
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    run_command(["git", "init", "-q"], tmp_path / "repo")
    run_command(["git", "add", "-A"], tmp_path / "repo")
    run_command(["git", "commit", "-qm", "v1"], tmp_path / "repo", env=env)
    assert lineage.git_dirty() is False

    for name in ("reports/metrics.json", "reports/check.json", "reports/plots/val_loss.csv", "params.yaml", "dvc.lock"):
        (project / name).write_text("changed by dvc\n")
    (project / "data/.gitignore").write_text("/prepared\n/vocab\n/tokens\n")  # the entries DVC adds
    assert lineage.git_dirty() is False
    (project / "data/.gitignore").write_text("/prepared\n/vocab\nsecrets.txt\n")  # a person's entry
    assert lineage.git_dirty() is True
    (project / "data/.gitignore").write_text("/prepared\n")
    (project / "code.py").write_text("print(2)\n")
    assert lineage.git_dirty() is True
    (project / "code.py").write_text("print(1)\n")
    (project / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text() + "# edited\n")  # the pipeline is code
    assert lineage.git_dirty() is True


# --- lmforge runs ---

@pytest.fixture(scope="module")
def tracked_run(store):
    from mlflow.tracking import MlflowClient

    uri = store
    client = MlflowClient(tracking_uri=uri)
    experiment_id = tracking.ensure_experiment(uri, "lmforge")
    tags = {"mlflow.source.git.commit": "c0ffee" * 6 + "c0ff", "lmforge.git_dirty": "false",
            "lmforge.dvc_experiment": "sappy-bice", "lmforge.hashes_from": "dvc.lock",
            "lmforge.corpus.path": "data/prepared", "lmforge.corpus.md5": "90a7026d.dir",
            "lmforge.tokenizer.path": "data/vocab", "lmforge.tokenizer.md5": "acce5bc3.dir",
            "lmforge.tokens.path": "data/tokens", "lmforge.tokens.md5": "3e6b487f.dir"}
    run = client.create_run(experiment_id, run_name="sappy-bice", tags=tags)
    client.log_param(run.info.run_id, "optimizer.lr", "0.0003")
    client.log_param(run.info.run_id, "model.n_layer", "4")
    client.log_metric(run.info.run_id, "eval/val_loss", 1.7751)
    client.set_terminated(run.info.run_id)
    return uri, run.info.run_id


def test_runs_show_prints_the_lineage_params_and_metrics(tracked_run, capsys):
    from lmforge.cli.main import main

    uri, run_id = tracked_run
    main(["runs", "show", run_id, "--tracking-uri", uri])
    out = capsys.readouterr().out
    for expected in (run_id, "c0ffeec0ffee", "(clean)", "sappy-bice", "data/prepared", "90a7026d.dir",
                     "acce5bc3.dir", "3e6b487f.dir", "hashes from      dvc.lock", "optimizer.lr", "0.0003",
                     "eval/val_loss", "1.7751"):
        assert expected in out, expected


def test_runs_list_shows_the_dvc_experiment_and_val_loss(tracked_run, capsys):
    from lmforge.cli.main import main

    uri, run_id = tracked_run
    main(["runs", "list", "--experiment", "lmforge", "--tracking-uri", uri])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run", "id", "name", "dvc", "experiment", "status", "eval/val_loss"]
    assert lines[1].split() == [run_id, "sappy-bice", "sappy-bice", "FINISHED", "1.7751"]


def test_runs_show_prints_each_attempt_and_the_settings_in_force_at_the_end(store, capsys):
    from mlflow.tracking import MlflowClient

    from lmforge.cli.main import main

    client = MlflowClient(tracking_uri=store)
    run = client.create_run(tracking.ensure_experiment(store, "attempts"), run_name="second")
    for key, value in {"optimizer.lr": "0.0003", "train.max_steps": "400", "trainer.precision": "auto",
                       "attempt2/trainer.precision": "32"}.items():
        client.log_param(run.info.run_id, key, value)
    client.set_tag(run.info.run_id, "lmforge.attempts", "2")
    changed = "trainer.precision: auto -> 32; run name: first -> second"
    client.set_tag(run.info.run_id, "lmforge.attempt2.changed", changed)
    main(["runs", "show", run.info.run_id, "--tracking-uri", store])
    out = capsys.readouterr().out
    assert "attempts         2 (the run was continued after an interruption)" in out
    assert "  2: changed trainer.precision: auto -> 32; run name: first -> second" in out
    assert "params (as of the last attempt)" in out
    assert "  trainer.precision      32" in out and "  optimizer.lr           0.0003" in out


def test_an_unknown_run_is_one_line_and_exit_1(tracked_run, capsys):
    from lmforge.cli.main import main

    uri, _ = tracked_run
    with pytest.raises(SystemExit) as exit_info:
        main(["runs", "show", "0" * 32, "--tracking-uri", uri])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: there is no run '{'0' * 32}'") and err.count("\n") == 1


# --- The report ---

def test_the_report_has_the_metrics_table_the_plots_and_the_samples(tmp_path):
    from lmforge.evaluation.report import write_report
    from lmforge.model.directory import load_model_dir
    from tests.helpers import make_model_dir

    loaded = load_model_dir(make_model_dir(tmp_path / "model"))
    reports = tmp_path / "reports"
    png = reports / "plots/loss.png"
    png.parent.mkdir(parents=True)
    png.write_bytes(b"\x89PNG\r\n\x1a\n")
    metrics = {"val_loss": 1.79312, "val_tokens": 531881}
    samples = [("**ROMEO**\n", "Speak, ```fair``` lord."), ("To be", ", or not")]
    text = write_report(reports / "report.md", loaded, metrics, [png], samples).read_text()
    assert "| validation loss (nats/token) | 1.7931 |" in text
    assert "| validation tokens | 531,881 |" in text
    assert "![loss](plots/loss.png)" in text  # relative: renders wherever reports/ is opened
    assert "````text\n**ROMEO**\nSpeak, ```fair``` lord.\n````" in text  # a fence the sample cannot close
    assert "```text\nTo be, or not\n```" in text
    assert not list(reports.glob(".*"))  # written atomically: no temporary file left


@pytest.mark.slow
def test_training_in_process_leaves_the_environment_as_it_was(tiny_cfg, tmp_path, monkeypatch):
    # mlflow.set_tracking_uri / set_registry_uri export MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI:
    # a notebook (or a test) that trains must keep its own default store for what it runs next.
    from lmforge.corpus.stage import prepare_stage
    from lmforge.tokenization.encode import tokenize_stage
    from lmforge.tokenization.vocab import vocab_stage
    from lmforge.training.stage import train_stage

    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(key, raising=False)
    tiny_cfg.data.sources = [str(write_corpus(tmp_path / "corpus", n_docs=12, words=300))]
    prepare_stage(tiny_cfg)
    vocab_stage(tiny_cfg)
    tokenize_stage(tiny_cfg)
    tiny_cfg.train.max_steps = 5
    assert tiny_cfg.tracking.log_model  # the registered pyfunc model too
    train_stage(tiny_cfg)
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
