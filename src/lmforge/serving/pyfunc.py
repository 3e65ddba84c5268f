"""Serving: a model directory as an MLflow pyfunc model, logged on its training run and registered.

The train stage calls ``log_pyfunc_model`` at the end of a run (``tracking.log_model``), and
registers the model under ``tracking.registered_model`` (null: not registered). Then::

    mlflow models serve -m models:/lmforge-gpt/1 --env-manager local --host 127.0.0.1 --port 5001
    curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
        -d '{"dataframe_records": [{"prompt": "ROMEO:"}], "params": {"max_new_tokens": 50, "seed": 1}}'
    {"predictions": ["..."]}

Input: prompts, one per row of a string column ``prompt``. Params (all optional): the fields of
``lmforge.inference.sampling.SamplingConfig`` (``max_new_tokens``, ``temperature``, ``top_k``,
``top_p``, ``repetition_penalty``, ``seed``) with its defaults, and ``stop``, a list of strings.
Output: the continuation of each prompt (without the prompt). Equal prompts in one request are
sampled as one batch, so they give different samples. A bad value is an HTTP 400 naming it.

The model is logged as code (MLflow "models from code"), not as a pickle: its code file imports
``lmforge.serving.pyfunc`` from the environment, which therefore needs lmforge installed
(``--env-manager local`` serves from the current virtualenv).
"""

from __future__ import annotations

import dataclasses
import tempfile
import warnings
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

from lmforge.errors import LmforgeError
from lmforge.inference.sampling import SamplingConfig, sampling_config

PYFUNC_NAME = "pyfunc"  # the logged model's name in its run (the run's model directory is "model")
MODEL_DIR_ARTIFACT = "model_dir"
# The model's code: MLflow runs this file to get the model (nothing is unpickled).
_MODEL_CODE = '''"""The lmforge text-generation pyfunc model (MLflow models from code)."""
import mlflow

from lmforge.serving.pyfunc import TextGenerationModel

mlflow.models.set_model(TextGenerationModel())
'''
# SamplingConfig fields served as params, with their MLflow types; use_cache never changes the
# text, so it stays on.
_SERVED = {"max_new_tokens": "long", "temperature": "double", "top_k": "long", "top_p": "double",
           "repetition_penalty": "double", "seed": "long"}


class TextGenerationModel(PythonModel):
    """Prompts in, completions out, from the model directory among the pyfunc's artifacts."""

    def load_context(self, context) -> None:
        from lmforge.model.directory import load_model_dir

        self.loaded = load_model_dir(context.artifacts[MODEL_DIR_ARTIFACT])

    # The DataFrame hint tells MLflow the signature (given at logging) does the validation.
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> list[str]:
        """One completion per prompt of ``model_input`` (a ``prompt`` column or a list of strings)."""
        from mlflow.exceptions import MlflowException

        from lmforge.inference.generation import complete_samples

        prompts = _prompts(model_input)
        try:
            sampling, stop = sampling_from_params(params or {})
            completions = [""] * len(prompts)
            rows_of: dict[str, list[int]] = {}
            for row, prompt in enumerate(prompts):
                rows_of.setdefault(prompt, []).append(row)
            for prompt, rows in rows_of.items():
                for row, text in zip(rows, complete_samples(self.loaded, prompt, sampling, stop, len(rows))):
                    completions[row] = text
        except LmforgeError as err:  # a bad parameter or an unencodable prompt: HTTP 400, one sentence
            raise MlflowException.invalid_parameter_value(str(err)) from None
        return completions


def _prompts(model_input) -> list[str]:
    # The signature turns any input into a DataFrame; {"prompt": [a, b]} arrives as one row
    # holding the list, so list-like cells are flattened.
    if isinstance(model_input, pd.DataFrame):
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        model_input = model_input[column].tolist()
    elif isinstance(model_input, dict):
        model_input = model_input.get("prompt", [])
    if isinstance(model_input, str):
        return [model_input]
    prompts: list[str] = []
    for item in model_input:
        if isinstance(item, str):
            prompts.append(item)
        else:
            prompts.extend(str(p) for p in item)
    return prompts


def sampling_from_params(params: dict) -> tuple[SamplingConfig, list[str]]:
    """A validated SamplingConfig and the stop strings from pyfunc ``params``.

    Values arrive as JSON/numpy scalars; None (or a missing key) means SamplingConfig's default.
    Raises LmforgeError (a ConfigError) naming the first bad value.
    """
    unknown = sorted(set(params) - set(_SERVED) - {"stop"})
    if unknown:
        raise LmforgeError(f"unknown parameter {unknown[0]!r}; the parameters are {', '.join(_SERVED)}, stop.")
    values = {}
    for name, kind in _SERVED.items():
        value = params.get(name)
        if value is None:
            continue
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise LmforgeError(f"parameter {name}={value!r} is not a number.") from None
        # A long param given a fraction stays a float, so validate() names it.
        values[name] = int(value) if kind == "long" and value.is_integer() else value
    return sampling_config(values, prefix="sampling."), [str(s) for s in (params.get("stop") or [])]


def signature():
    """The pyfunc signature: a string column ``prompt`` in, strings out, sampling params."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    defaults = {f.name: f.default for f in dataclasses.fields(SamplingConfig)}
    specs = [ParamSpec(name, kind, defaults[name]) for name, kind in _SERVED.items()]
    specs.append(ParamSpec("stop", "string", [], shape=(-1,)))
    return ModelSignature(inputs=Schema([ColSpec("string", "prompt")]), outputs=Schema([ColSpec("string")]),
                          params=ParamSchema(specs))


def pip_requirements() -> list[str]:
    """What the served model needs: lmforge (which brings the rest) and the torch and mlflow it ran with."""
    import torch

    # Given explicitly: MLflow's own inference of requirements costs about 10 s a model.
    return [lmforge_requirement(), f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"]


def lmforge_requirement() -> str:
    """lmforge as pip should install it: from the source it was installed from (PEP 610's
    ``direct_url.json``: ``lmforge @ file:///...``). lmforge is not on PyPI, so a bare
    ``lmforge==0.1.0`` would make an environment manager install whatever has that name there."""
    import json
    from importlib.metadata import PackageNotFoundError, distribution

    from lmforge.errors import LmforgeError

    try:
        direct = distribution("lmforge").read_text("direct_url.json")
    except PackageNotFoundError:
        direct = None
    url = json.loads(direct).get("url") if direct else None
    if not url:
        raise LmforgeError("lmforge is not installed from a source directory, so a served model could not name it as "
                           "a requirement; install it with `pip install -e .` (or `make install`) and train again.")
    return f"lmforge @ {url}"


def log_pyfunc_model(model_dir: str | Path, run: dict, registered_model: str | None = None):
    """Log ``model_dir`` as a pyfunc model on ``run`` (a ``run.json`` dict); register it if named.

    Returns MLflow's ModelInfo (``registered_model_version`` is set when registered). Sets
    MLflow's global tracking and registry URIs to the run's (not the process environment's).
    """
    from lmforge.tracking.runs import environment_kept, quiet_mlflow_env

    quiet_mlflow_env()
    with environment_kept(), tempfile.TemporaryDirectory() as tmp:
        mlflow.set_tracking_uri(run["tracking_uri"])
        mlflow.set_registry_uri(run["tracking_uri"])
        code = Path(tmp) / "lmforge_model.py"
        code.write_text(_MODEL_CODE, encoding="utf-8")
        with mlflow.start_run(run_id=run["run_id"]), warnings.catch_warnings():
            # An input example would make MLflow run the model while logging; the signature says it all.
            warnings.filterwarnings("ignore", message=".*input example was not provided.*")
            return mlflow.pyfunc.log_model(
                name=PYFUNC_NAME,
                python_model=str(code),
                artifacts={MODEL_DIR_ARTIFACT: str(Path(model_dir).resolve())},
                signature=signature(),
                pip_requirements=pip_requirements(),
                registered_model_name=registered_model or None,
            )
