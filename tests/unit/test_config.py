"""Configuration: params.yaml is the composition of conf/, and overrides fail clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from lmforge.config.compose import compose_config, load_config
from lmforge.errors import LmforgeError


def test_committed_params_equal_a_fresh_composition(project_root):
    # dvc repro never recomposes: a stale params.yaml would silently train the wrong thing.
    committed = yaml.safe_load((project_root / "params.yaml").read_text())
    fresh = OmegaConf.to_container(compose_config(conf_dir=project_root / "conf"), resolve=True)
    assert committed == fresh, "params.yaml is stale: run `lmforge compose` and commit it"


def test_key_override_and_group_override(project_root, monkeypatch):
    monkeypatch.chdir(project_root)
    cfg = load_config(["model=tiny", "train.max_steps=50", "optimizer.lr=3e-4"])
    assert cfg.model.n_embd == 32
    assert cfg.train.max_steps == 50
    assert cfg.optimizer.lr == pytest.approx(3e-4)


def test_same_overrides_compose_like_hydra(project_root, monkeypatch):
    monkeypatch.chdir(project_root)
    overrides = ["model=tiny", "train.max_steps=50", "tokenizer=bpe"]
    by_hand = OmegaConf.to_container(load_config(overrides), resolve=True)
    composed = OmegaConf.to_container(compose_config(overrides, conf_dir=project_root / "conf"), resolve=True)
    assert by_hand == composed


@pytest.mark.parametrize(
    "override, words",
    [
        ("model=nope", ["model", "nope", "baby", "tiny"]),
        ("train.max_stepz=5", ["train.max_stepz", "train.max_steps"]),
        ("train.max_steps=abc", ["train.max_steps", "int"]),
        ("no_equals_sign", ["key=value"]),
    ],
)
def test_bad_overrides_name_the_key(project_root, monkeypatch, override, words):
    monkeypatch.chdir(project_root)
    with pytest.raises(LmforgeError) as err:
        load_config([override])
    for word in words:
        assert word in str(err.value)


def test_missing_params_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LmforgeError, match="params.yaml not found"):
        load_config([])


def test_a_key_added_with_plus_is_refused(project_root, tmp_path):
    # `dvc exp run -S +train.max_stepz=5` writes the typo into params.yaml; the stage must refuse it.
    params = yaml.safe_load((project_root / "params.yaml").read_text())
    params["train"]["max_stepz"] = 5
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(params))
    with pytest.raises(LmforgeError) as err:
        load_config([], params_path=bad, conf_dir=project_root / "conf")
    assert "train.max_stepz" in str(err.value) and "train.max_steps" in str(err.value)


GROUPS = sorted(p.name for p in (Path(__file__).resolve().parents[2] / "conf").iterdir() if p.is_dir())


@pytest.mark.parametrize("group", GROUPS)
def test_an_unknown_key_under_any_group_is_refused(project_root, tmp_path, group):
    # `dvc exp run -S +optimizer.lrr=0.5` composes the typo into params.yaml: every group must refuse it.
    from lmforge.config.compose import check_known_keys

    first = sorted(compose_config(conf_dir=project_root / "conf")[group])[0]
    typo = f"+{group}.{first}x=1"
    cfg = compose_config([typo], conf_dir=project_root / "conf")
    with pytest.raises(LmforgeError) as err:
        check_known_keys(cfg, project_root / "conf")
    assert f"'{group}.{first}x'" in str(err.value) and f"{group}.{first}" in str(err.value).split("did you mean")[1]


def test_plus_optimizer_lrr_names_the_nearest_keys(project_root, tmp_path):
    from lmforge.config.compose import check_known_keys

    cfg = compose_config(["+optimizer.lrr=0.5"], conf_dir=project_root / "conf")
    with pytest.raises(LmforgeError, match=r"'optimizer\.lrr'.*did you mean optimizer\.lr"):
        check_known_keys(cfg, project_root / "conf")
