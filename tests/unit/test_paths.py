"""The one table of paths (``lmforge.config.paths``) is the one dvc.yaml and conf/ use."""

from __future__ import annotations

import yaml

from lmforge.config.paths import DVC_OUTPUTS
from tests.helpers import ROOT


def dvc_paths() -> set[str]:
    """Every path dvc.yaml names as a dep, out or metric of any stage."""
    found = set()
    for stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].values():
        for entry in [*stage.get("deps", []), *stage.get("outs", []), *stage.get("metrics", []),
                      *stage.get("plots", [])]:
            found.add(entry if isinstance(entry, str) else next(iter(entry)))
    return found


def test_every_dvc_output_of_the_table_is_in_dvc_yaml():
    paths = dvc_paths()
    for key, path in DVC_OUTPUTS.items():
        assert path in paths or any(p.startswith(path + "/") for p in paths), f"paths.{key}={path} is not in dvc.yaml"


def test_conf_gives_each_path_the_value_of_the_table():
    conf_paths = yaml.safe_load((ROOT / "conf/config.yaml").read_text())["paths"]
    assert {key: conf_paths[key] for key in DVC_OUTPUTS} == DVC_OUTPUTS
