"""Team scale on one machine: a remote MLflow tracking server (`mlflow server`, SQL store, artifact
root) selected by `tracking.uri=http://...`, and a DVC remote that restores data and models."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from tests.helpers import run_command, run_pipeline, write_corpus

pytestmark = pytest.mark.slow




def test_a_training_run_logs_to_a_remote_tracking_server(tracking_server, tiny_cfg, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from lmforge.cli.main import main
    from lmforge.model.directory import load_model_dir

    tiny_cfg.tracking.uri = tracking_server
    tiny_cfg.tracking.experiment = "remote-test"
    metrics = run_pipeline(tiny_cfg, write_corpus(tmp_path / "corpus", n_docs=12, words=300))

    run = load_model_dir(tiny_cfg.paths.model).run()
    assert run["tracking_uri"] == tracking_server
    client = MlflowClient(tracking_uri=tracking_server)
    tracked = client.get_run(run["run_id"])
    assert tracked.info.status == "FINISHED"
    assert tracked.data.params["train.max_steps"] == "20"
    assert tracked.data.metrics["eval/val_loss"] == pytest.approx(metrics["val_loss"])
    assert tracked.data.tags["lmforge.hashes_from"] == "hashed"  # stages run by hand: no dvc.lock to trust
    # Artifacts travel through the server (mlflow-artifacts:/), not onto this machine's disk by path.
    assert tracked.info.artifact_uri.startswith("mlflow-artifacts:")
    weights = client.download_artifacts(run["run_id"], "model/model.safetensors", str(tmp_path / "download"))
    assert Path(weights).read_bytes() == Path(tiny_cfg.paths.model, "model.safetensors").read_bytes()
    assert "report.md" in {a.path for a in client.list_artifacts(run["run_id"])}

    capsys.readouterr()
    main(["runs", "show", run["run_id"], "--tracking-uri", tracking_server])
    shown = capsys.readouterr().out
    assert tracked.data.tags["lmforge.tokens.md5"] in shown and "remote-test" in shown


def test_a_dvc_remote_restores_data_and_models(dvc_project, tmp_path):
    outputs = ["data/prepared", "data/vocab", "data/tokens", "models/gpt"]
    before = {str(p.relative_to(dvc_project)): _md5(p)
              for out in outputs for p in (dvc_project / out).rglob("*") if p.is_file()}
    assert any(name.endswith("model.safetensors") for name in before)
    cache = dvc_project / ".dvc/cache"
    kept_cache = tmp_path / "kept-cache"
    # --local: the remote goes to .dvc/config.local (not committed), so the shared project stays clean.
    run_command(["dvc", "remote", "add", "--local", "-d", "shared", str(tmp_path / "remote")], dvc_project)
    try:
        run_command(["dvc", "push"], dvc_project)
        shutil.move(cache, kept_cache)  # an empty cache: what a colleague's fresh clone has
        for out in outputs:
            shutil.rmtree(dvc_project / out)
        run_command(["dvc", "pull"], dvc_project)
        after = {str(p.relative_to(dvc_project)): _md5(p)
                 for out in outputs for p in (dvc_project / out).rglob("*") if p.is_file()}
        assert after == before
        assert "up to date" in run_command(["dvc", "status"], dvc_project).stdout
    finally:
        run_command(["dvc", "remote", "remove", "--local", "shared"], dvc_project, check=False)
        if kept_cache.exists():
            shutil.rmtree(cache, ignore_errors=True)
            shutil.move(kept_cache, cache)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()
