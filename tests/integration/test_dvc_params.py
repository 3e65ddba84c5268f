"""dvc.yaml declares every param a stage reads: recorded while the real stages run on a tiny project.

``paths.*`` are not params: dvc.yaml names the paths as literal deps and outs, and a stage under
DVC refuses a ``paths.*`` that differs from them (``config.checks.check_dvc_paths``)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from tests.helpers import ROOT
from tests.unit.test_dvc_deps import STAGE_NAMES, dvc_stages


@contextlib.contextmanager
def recording_reads(root):
    """Record the full key of every value of config ``root`` read through attribute, item or ``get``
    access (configs made from parts of it, e.g. the optimizer's dict, are read already: by key)."""
    from omegaconf import DictConfig

    reads: set[str] = set()
    originals = {name: getattr(DictConfig, name) for name in ("__getattr__", "__getitem__", "get")}

    def wrap(name):
        original = originals[name]

        def read(self, key, *args, **kwargs):
            value = original(self, key, *args, **kwargs)
            if isinstance(key, str) and not key.startswith("_") and self._get_root() is root:
                with contextlib.suppress(Exception):
                    reads.add(self._get_full_key(key))
            return value

        return read

    for name in originals:
        setattr(DictConfig, name, wrap(name))
    try:
        yield reads
    finally:
        for name, original in originals.items():
            setattr(DictConfig, name, original)


def covered(key: str, params: list[str]) -> bool:
    """A read of ``key`` is declared by a param equal to it or above it; reading a group node on
    the way to its keys (``cfg.train`` then ``.max_steps``) is covered by any declared key below it."""
    return any(key == p or key.startswith(p + ".") or p.startswith(key + ".") for p in params)


@pytest.fixture(scope="module")
def stage_reads(tmp_path_factory, one_thread) -> dict[str, set[str]]:
    from lmforge.config.compose import compose_config, write_params
    from lmforge.stages.runner import stage_function
    from tests.helpers import TINY_PIPELINE, write_corpus

    project = tmp_path_factory.mktemp("deps")
    cfg = compose_config([*TINY_PIPELINE, f"tracking.uri=sqlite:///{project}/mlflow.db", "tracking.log_model=false"],
                         conf_dir=ROOT / "conf")
    reads = {}
    with contextlib.chdir(project):
        cfg.data.sources = [str(write_corpus(Path("corpus"), n_docs=6, words=200))]
        write_params(cfg)
        for stage in STAGE_NAMES:
            with recording_reads(cfg) as seen:
                stage_function(stage)(cfg)
            reads[stage] = seen
    return reads


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_every_param_a_stage_reads_is_declared(stage_reads, stage):
    spec = dvc_stages()[stage]
    params = [p if isinstance(p, str) else next(iter(p)) for p in spec.get("params", [])]
    paths = {str(p) for p in [*spec.get("deps", []), *spec.get("outs", []), *spec.get("metrics", []),
                              *spec.get("plots", [])] if isinstance(p, str)}
    paths |= {next(iter(p)) for p in [*spec.get("outs", []), *spec.get("metrics", []), *spec.get("plots", [])]
              if isinstance(p, dict)}
    reads = stage_reads[stage]
    assert reads, "nothing was recorded: the recorder is broken"
    missing = sorted(k for k in reads if not k.startswith("paths") and not covered(k, params))
    assert not missing, f"dvc.yaml stage '{stage}' reads these params but does not declare them: {missing}"
    # paths.* are not params: the directory a stage reads or writes must be a literal dep or out.
    from lmforge.config.paths import DVC_OUTPUTS

    for key in (k for k in reads if k.startswith("paths.")):
        where = DVC_OUTPUTS[key.split(".", 1)[1]]
        assert any(p == where or p.startswith(where + "/") for p in paths), (
            f"stage '{stage}' reads {key} ({where}) but dvc.yaml names it in none of its deps or outs")
