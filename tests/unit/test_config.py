"""Configuration: params.yaml is the composition of conf/, and overrides fail clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from lmforge.config.compose import compose_config, is_global_group, load_config
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


# Experiments (``# @package _global_``) set keys of the other groups and have none of their own.
GROUPS = sorted(p.name for p in (Path(__file__).resolve().parents[2] / "conf").iterdir()
                if p.is_dir() and not is_global_group(p))


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


# --- One sentence for a bad group choice, wherever it is met (issue 20 item 7) ---

@pytest.mark.parametrize("override, choices", [("model=nope", "baby, baby-llama, gpt2-medium"),
                                               ("tokenizer=BPE", "bpe, char, word")])
def test_a_bad_group_choice_is_the_same_sentence_composed_or_loaded(project_root, monkeypatch, override, choices):
    monkeypatch.chdir(project_root)
    group, choice = override.split("=")
    expected = f"unknown choice '{choice}' for config group '{group}'; valid choices: {choices}"
    with pytest.raises(LmforgeError) as composed:
        compose_config([override], conf_dir=project_root / "conf")
    with pytest.raises(LmforgeError) as loaded:
        load_config([override])
    assert str(composed.value) == str(loaded.value)
    assert str(composed.value).startswith(expected) and "\n" not in str(composed.value)


def test_an_unknown_key_is_the_same_sentence_composed_or_loaded(project_root, monkeypatch):
    monkeypatch.chdir(project_root)
    with pytest.raises(LmforgeError) as composed:
        compose_config(["train.max_stepz=5"], conf_dir=project_root / "conf")
    with pytest.raises(LmforgeError) as loaded:
        load_config(["train.max_stepz=5"])
    assert str(composed.value) == str(loaded.value)
    assert "'train.max_stepz' (did you mean train.max_steps" in str(composed.value)


def test_any_other_hydra_error_is_one_line(project_root):
    with pytest.raises(LmforgeError) as err:
        compose_config(["train.max_steps=[1"], conf_dir=project_root / "conf")
    assert "\n" not in str(err.value) and "train.max_steps=[1" in str(err.value)
    assert "Config search path" not in str(err.value)


def test_one_line_drops_hydras_search_path_and_option_list():
    from lmforge.config.compose import one_line

    dump = ("In 'config': Could not find 'model/nope'\n\nAvailable options in 'model':\n\tbaby\n\ttiny\n"
            "Config search path:\n\tprovider=hydra, path=pkg://hydra.conf\n")
    assert one_line(dump) == "In 'config': Could not find 'model/nope'."
    assert one_line("Could not override 'a.b'.\nTo append to your config use +a.b=1.") == \
        "Could not override 'a.b'; To append to your config use +a.b=1."


# --- A single source string is a list of one (issue 20 item 10) ---

def test_a_single_source_string_is_a_list_of_one_everywhere(project_root, monkeypatch, tmp_path):
    monkeypatch.chdir(project_root)
    assert list(load_config(["data.sources=corpus/small"]).data.sources) == ["corpus/small"]
    composed = compose_config(["data.sources=corpus/small"], conf_dir=project_root / "conf")
    assert list(composed.data.sources) == ["corpus/small"]
    # what `dvc exp run -S data.sources=corpus/small` writes into params.yaml
    params = yaml.safe_load((project_root / "params.yaml").read_text())
    params["data"]["sources"] = "corpus/small"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert list(load_config(params_path=tmp_path / "params.yaml", conf_dir=project_root / "conf").data.sources) \
        == ["corpus/small"]


# --- The one type rule (issue 18 item 3) ---

@pytest.mark.parametrize("value, example, same", [
    (1, 0.5, True), (0.5, 1, False), (2.0, 1, True), (True, 1, False), (1, True, False), (True, False, True),
    ("32", "auto", True), (32, "auto", True), ([1], "auto", False), ({"a": 1}, {"b": 2}, True), ("x", [1], False),
    (None, 1, True), pytest.param(10**400, 1.0, True, id="an-int-beyond-any-float"), (float("nan"), 1, False),
])
def test_same_kind_is_the_one_type_rule(value, example, same):
    from lmforge.config.values import same_kind

    assert same_kind(value, example) is same
    assert same_kind(OmegaConf.create({"v": value}).v if isinstance(value, (list, dict)) else value, example) is same


def test_a_type_error_of_a_key_with_no_range_rule_reads_alike_in_check_and_override(project_root, monkeypatch):
    monkeypatch.chdir(project_root)
    with pytest.raises(LmforgeError, match=r"tracking.log_model=1 has the wrong type: expected bool"):
        load_config(["tracking.log_model=1"])


# --- params.yaml that a failed `dvc exp run -S` left behind (issue 20 item 5) ---

def stale_params(project_root, tmp_path, **changes) -> Path:
    params = yaml.safe_load((project_root / "params.yaml").read_text())
    for key, value in changes.items():
        section, name = key.split("__")
        params[section][name] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return tmp_path / "params.yaml"


def test_an_error_naming_a_value_params_yaml_kept_says_where_it_came_from(project_root, tmp_path):
    from lmforge.config.compose import with_stale_params

    params = stale_params(project_root, tmp_path, data__val_fraction=1.5)
    message = "data.val_fraction=1.5 must be in (0, 1) (e.g. 0.1)."
    said = with_stale_params(message, params_path=params, conf_dir=project_root / "conf")
    assert said.startswith("data.val_fraction=1.5 must be in (0, 1) (e.g. 0.1); params.yaml sets data.val_fraction=1.5 "
                           "where conf/ gives 0.1: a failed `dvc exp run -S` leaves its overrides in params.yaml")
    assert "`git checkout params.yaml` or `lmforge compose`" in said and "\n" not in said
    # The value came from the command line, or the error is about another key: nothing to add.
    assert with_stale_params(message, ["data.val_fraction=1.5"], params, project_root / "conf") == message
    assert with_stale_params("train.max_steps=0 must be a positive integer.", (), params, project_root / "conf") \
        == "train.max_steps=0 must be a positive integer."
    fresh = stale_params(project_root, tmp_path)
    assert with_stale_params(message, (), fresh, project_root / "conf") == message


def test_the_finetune_experiment_composes_as_dvc_exp_run_and_by_hand(project_root, tmp_path, monkeypatch):
    # `dvc exp run -S experiment=finetune` composes with Hydra; a stage run by hand with
    # experiment=finetune applies the same file over params.yaml: both give the same config.
    from lmforge.config.compose import flat_params, write_params
    from lmforge.stages.check import problems

    conf = project_root / "conf"
    hydra = compose_config(["experiment=finetune", "finetune.base=org/name"], conf_dir=conf)
    assert "experiment" not in hydra and hydra.optimizer.name == "adamw" and hydra.finetune.base == "org/name"
    assert hydra.train.max_steps == 300 and hydra.finetune.method == "full"
    assert problems(hydra, conf) == []
    monkeypatch.chdir(tmp_path)
    write_params(compose_config(conf_dir=conf))
    by_hand = load_config(["experiment=finetune", "finetune.base=org/name"], conf_dir=conf)
    assert flat_params(by_hand) == flat_params(hydra)
    with pytest.raises(LmforgeError, match="unknown choice 'nope' for config group 'experiment'"):
        load_config(["experiment=nope"], conf_dir=conf)
