"""Serving: the model as an MLflow pyfunc (prompts and sampling params in, completions out),
registered by the train stage, loaded by URI, and answered by `mlflow models serve`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from lmforge.errors import LmforgeError
from lmforge.inference.generation import SamplingConfig, complete_samples
from lmforge.model.directory import fetch_model_dir, load_model_dir, write_run_info
from lmforge.serving.pyfunc import PYFUNC_NAME, log_pyfunc_model, sampling_from_params
from tests.helpers import make_model_dir, run_cli, stop_process_group, write_corpus

BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def tracked_model(tmp_path):
    """A model directory with a run in a fresh MLflow store: (model_dir, run dict)."""
    from mlflow.tracking import MlflowClient

    from lmforge.tracking import runs as tracking

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    experiment_id = tracking.ensure_experiment(uri, "serving-test")
    run_id = MlflowClient(tracking_uri=uri).create_run(experiment_id).info.run_id
    run = {"tracking_uri": uri, "experiment_id": experiment_id, "run_id": run_id}
    model_dir = make_model_dir(tmp_path / "model")
    write_run_info(model_dir, run)
    tracking.log_to_run(run, artifact_dirs={"model": model_dir})  # what the train stage logs
    return model_dir, run


def test_params_become_a_validated_sampling_config():
    sampling, stop = sampling_from_params({"max_new_tokens": 5.0, "temperature": 0, "top_k": 3, "seed": 7,
                                           "stop": ["\n"], "top_p": None})
    assert sampling == SamplingConfig(max_new_tokens=5, temperature=0.0, top_k=3, seed=7)
    assert isinstance(sampling.max_new_tokens, int) and stop == ["\n"]
    assert sampling_from_params({}) == (SamplingConfig(), [])
    for params, message in [
        ({"top_p": 1.5}, "sampling.top_p=1.5 must be in (0, 1]"),
        ({"temperature": -1}, "sampling.temperature=-1.0 must be a finite number >= 0"),
        ({"max_new_tokens": 0}, "sampling.max_new_tokens=0 must be an integer >= 1"),
        ({"top_k": 2.5}, "sampling.top_k=2.5 must be an integer >= 1"),
        ({"temperature": "hot"}, "parameter temperature='hot' is not a number"),
        ({"beams": 4}, "unknown parameter 'beams'"),
    ]:
        with pytest.raises(LmforgeError, match=message.replace("(", r"\(").replace("]", r"\]")):
            sampling_from_params(params)


def test_logged_pyfunc_is_registered_and_predicts_completions(tracked_model):
    import mlflow
    from mlflow.exceptions import MlflowException

    model_dir, run = tracked_model
    info = log_pyfunc_model(model_dir, run, "tiny-gpt")
    assert info.registered_model_version == 1
    pyfunc = mlflow.pyfunc.load_model("models:/tiny-gpt/1")
    params = {"max_new_tokens": 12, "temperature": 1.0, "top_k": 10, "seed": 4}
    got = pyfunc.predict({"prompt": ["the king", "good", "the king"]}, params=params)
    loaded = load_model_dir(model_dir)
    cfg = SamplingConfig(max_new_tokens=12, temperature=1.0, top_k=10, seed=4)
    king = complete_samples(loaded, "the king", cfg, num_samples=2)  # equal prompts: one batch
    assert got == [king[0], complete_samples(loaded, "good", cfg)[0], king[1]]
    with pytest.raises(MlflowException, match=r"sampling.top_p=2.0 must be in \(0, 1\]"):
        pyfunc.predict({"prompt": ["the"]}, params={"top_p": 2.0})
    with pytest.raises(MlflowException, match="outside the model's vocabulary"):
        pyfunc.predict({"prompt": ["caf\u00e9"]})


def test_models_are_named_by_run_and_registry_uris(tracked_model, capsys):
    model_dir, run = tracked_model
    log_pyfunc_model(model_dir, run, "tiny-gpt")
    uri = run["tracking_uri"]
    expected = (model_dir / "model.safetensors").read_bytes()
    for ref in (f"runs:/{run['run_id']}/model", f"runs:/{run['run_id']}/{PYFUNC_NAME}", "models:/tiny-gpt/1"):
        local = fetch_model_dir(ref, uri)
        assert (local / "model.safetensors").read_bytes() == expected, ref
    code, out, err = run_cli(["generate", "--model", "models:/tiny-gpt/1", "--tracking-uri", uri, "--prompt", "the",
                              "--max-new-tokens", 8, "--temperature", 0], capsys)
    assert code == 0 and out.startswith("the") and len(out) > len("the\n")
    code, out, err = run_cli(["generate", "--model", "models:/tiny-gpt/9", "--tracking-uri", uri, "--prompt", "the"],
                             capsys)
    assert code == 1 and err.startswith(f"error: cannot download models:/tiny-gpt/9 from {uri}")
    assert err.count("\n") == 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.slow
def test_train_stage_registers_a_model_that_mlflow_serves(tiny_cfg, tmp_path):
    from lmforge.corpus.stage import prepare_stage
    from lmforge.tokenization.encode import tokenize_stage
    from lmforge.tokenization.vocab import vocab_stage
    from lmforge.training.stage import train_stage

    tiny_cfg.data.sources = [str(write_corpus(tmp_path / "corpus", n_docs=12, words=300))]
    tiny_cfg.tracking.registered_model = "served-gpt"
    tiny_cfg.train.max_steps = 10
    prepare_stage(tiny_cfg)
    vocab_stage(tiny_cfg)
    tokenize_stage(tiny_cfg)
    model_dir = train_stage(tiny_cfg)
    run = json.loads((model_dir / "run.json").read_text())

    port = free_port()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "MLFLOW_TRACKING_URI": run["tracking_uri"],
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    server = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", "models:/served-gpt/1", "--env-manager",
                               "local", "--host", "127.0.0.1", "--port", str(port)], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                assert server.poll() is None, server.stdout.read().decode()[-3000:]
                assert time.monotonic() < deadline, "mlflow models serve did not answer /ping in 90 s"
                time.sleep(0.3)
        url = f"http://127.0.0.1:{port}/invocations"
        params = {"max_new_tokens": 30, "temperature": 0.8, "top_k": 20, "seed": 1}
        status, body = post(url, {"dataframe_records": [{"prompt": "The king"}, {"prompt": "Good"}], "params": params})
        assert status == 200, body
        loaded = load_model_dir(model_dir)
        cfg = SamplingConfig(max_new_tokens=30, temperature=0.8, top_k=20, seed=1)
        assert body["predictions"] == [complete_samples(loaded, p, cfg)[0] for p in ("The king", "Good")]
        assert any(len(text) > 5 for text in body["predictions"])
        status, body = post(url, {"inputs": {"prompt": ["The"]}, "params": {"temperature": -1.0}})
        assert status == 400 and "sampling.temperature=-1.0 must be a finite number >= 0" in body["message"]
    finally:
        stop_process_group(server)


def test_the_pip_requirement_names_lmforge_by_its_source_not_pypi():
    # `lmforge==0.1.0` names a PyPI package that is not ours: pip must install this source instead.
    from importlib.metadata import distribution

    from packaging.requirements import Requirement

    from lmforge.serving.pyfunc import pip_requirements

    requirement = Requirement(pip_requirements()[0])
    assert requirement.name == "lmforge" and not requirement.specifier
    assert requirement.url == json.loads(distribution("lmforge").read_text("direct_url.json"))["url"]
    assert requirement.url.startswith("file://")
