"""A run continued after an interruption: what each attempt records (params stay write-once, as
MLflow requires; what changed goes to attempt<n>/ params and the attempt tags)."""

from __future__ import annotations

from lmforge.tracking.attempts import ATTEMPTS_TAG, current_params, next_attempt, param_value

FIRST = {"train.resume": "never", "trainer.num_threads": "1", "optimizer.lr": "0.008", "hardware.precision": "32"}
LINEAGE = {"mlflow.source.git.commit": "a" * 40, "lmforge.git_dirty": "false", "lmforge.dvc_experiment": "first"}


def test_a_second_attempt_logs_what_changed_and_takes_the_name_and_lineage_of_the_attempt_that_finished():
    now = {**FIRST, "train.resume": "auto", "trainer.num_threads": 2}
    tags = {**LINEAGE, "lmforge.dvc_experiment": "second"}
    attempt = next_attempt(FIRST, LINEAGE, "first", now, tags, "second")
    assert attempt.number == 2
    # MLflow refuses a second value for a param: the new values go under attempt2/.
    assert attempt.params == {"attempt2/train.resume": "auto", "attempt2/trainer.num_threads": "2"}
    assert attempt.tags == {"lmforge.dvc_experiment": "second", ATTEMPTS_TAG: "2",
                            "lmforge.attempt2.changed": "train.resume: never -> auto; trainer.num_threads: 1 -> 2; "
                                                        "lmforge.dvc_experiment: first -> second; "
                                                        "run name: first -> second"}
    assert attempt.deleted_tags == []
    assert current_params({**FIRST, **attempt.params})["trainer.num_threads"] == "2"


def test_a_third_attempt_compares_with_the_second_and_an_attempt_outside_dvc_drops_the_experiment_tag():
    logged = {**FIRST, "attempt2/trainer.num_threads": "2"}
    logged_tags = {**LINEAGE, ATTEMPTS_TAG: "2"}
    now = {**FIRST, "trainer.num_threads": 2, "trainer.precision": "bf16-mixed"}
    tags = {**LINEAGE, "lmforge.dvc_experiment": None, "lmforge.git_dirty": "true"}
    attempt = next_attempt(logged, logged_tags, "first", now, tags, "gpt-char")
    assert attempt.number == 3
    assert attempt.params == {"attempt3/trainer.precision": "bf16-mixed"}  # num_threads was 2 already
    assert attempt.deleted_tags == ["lmforge.dvc_experiment"]
    assert attempt.tags["lmforge.git_dirty"] == "true"
    assert attempt.changes == ["trainer.precision: (unset) -> bf16-mixed", "lmforge.git_dirty: false -> true",
                               "lmforge.dvc_experiment: first -> (none)", "run name: first -> gpt-char"]


def test_nothing_changed_is_said_and_the_latest_attempt_wins():
    attempt = next_attempt(FIRST, LINEAGE, "first", dict(FIRST), dict(LINEAGE), "first")
    assert attempt.params == {} and attempt.tags["lmforge.attempt2.changed"] == "nothing"
    params = {"a": "1", "attempt2/a": "2", "attempt10/a": "10", "attempt3/a": "3", "attempt3/b": "x"}
    assert current_params(params) == {"a": "10", "b": "x"}  # numeric order: attempt 10 after attempt 3


def test_values_are_the_text_mlflow_stores_cut_at_its_limit():
    assert param_value(None) == "None" and param_value([1, 2]) == "[1, 2]"
    assert len(param_value("x" * 10_000)) == 6000
