"""The range table (lmforge.config.rules): every numeric key of conf/ has a rule, and `lmforge check`'s
checks refuse every out-of-range value of every numeric key in one sentence naming it."""

from __future__ import annotations

import math

import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from lmforge.config.compose import GLOBAL_PACKAGE, compose_config, flat_items
from lmforge.config.rules import NOT_NUMBERS, RULES, check_setting, range_problems, rules_table, vocab_size_problem
from lmforge.errors import LmforgeError
from lmforge.stages.check import problems
from tests.helpers import ROOT

CONF = ROOT / "conf"


def conf_values() -> dict[str, list]:
    """Every dotted key of every file under conf/ (group keys prefixed), with the values the files give it."""
    found: dict[str, list] = {}
    for path in sorted(CONF.glob("**/*.yaml")):
        top = path.parent == CONF or path.read_text().startswith(GLOBAL_PACKAGE)  # conf/experiment/
        prefix = "" if top else ".".join(path.relative_to(CONF).parts[:-1]) + "."
        body = yaml.safe_load(path.read_text()) or {}
        if not top:
            body.pop("defaults", None)
        for key, value in flat_items(body).items():
            found.setdefault(prefix + key, []).append(value)
    found.pop("defaults", None)
    return found


def is_numeric(values: list) -> bool:
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    return any(number(v) or isinstance(v, list) and v and all(number(x) for x in v) for v in values)


VALUES = conf_values()
NUMERIC = sorted(key for key, values in VALUES.items() if is_numeric(values))
ALWAYS_NULL = sorted(key for key, values in VALUES.items() if all(v is None for v in values))
# Where zero is a legitimate value. Written here, apart from the table, so that a rule that starts
# (or stops) taking 0 is a decision this test sees.
ZERO_OK = {"seed", "evaluate.seed", "train.grad_clip", "evaluate.temperature", "data.min_chars",
           "tokenizer.min_frequency", "model.dropout", "optimizer.min_lr_ratio", "optimizer.weight_decay",
           "optimizer.warmup_steps", "optimizer.cooldown_fraction", "optimizer.betas", "optimizer.muon_momentum",
           "optimizer.muon_weight_decay", "optimizer.muon_normuon_beta2",  # beta2 0: this step's statistics alone
           "finetune.lora.dropout"}


def test_the_walk_finds_the_numeric_keys():
    assert {"seed", "data.val_fraction", "tokenizer.vocab_size", "optimizer.lr", "optimizer.betas",
            "model.n_kv_head", "trainer.devices"} <= set(NUMERIC)
    assert "train.global_batch_tokens" in ALWAYS_NULL and "optimizer.name" not in NUMERIC


def test_every_numeric_key_of_conf_has_a_rule():
    # A new numeric key in any conf/ file fails here until the table says what it takes.
    assert [key for key in NUMERIC if key not in RULES] == []


def test_every_key_conf_leaves_null_is_a_rule_or_is_said_to_take_no_number():
    # The walk cannot tell the type of a key that every file sets to null.
    assert [key for key in ALWAYS_NULL if key not in RULES and key not in NOT_NUMBERS] == []


def test_the_table_has_no_rule_for_a_key_conf_lacks():
    assert sorted(set(RULES) - set(VALUES)) == ["model.vocab_size"]  # a model directory's, from the tokenizer
    assert [key for key in NOT_NUMBERS if key not in VALUES] == []


def test_zero_is_taken_exactly_where_the_table_says_so():
    zero = {key: [0.0, 0.0] if key == "optimizer.betas" else 0 for key in NUMERIC}
    takes_zero = {key for key in NUMERIC if RULES[key].problem(key, zero[key]) is None}
    assert takes_zero == ZERO_OK


# --- Every out-of-range value of every numeric key, through the checks `lmforge check` runs -------

HYDRA = OverridesParser.create()
BAD_ALWAYS = ("-1", "nan", "inf", "-inf", "abc", "true")  # no numeric key takes any of these
MAYBE = ("0", "1e300", "1000000000000000000000000000000")  # zero, a huge float, an int beyond 64 bits


def hydra_value(text: str):
    """``text`` as `lmforge check key=TEXT` (and `dvc exp run -S`) reads it: Hydra's override grammar."""
    return HYDRA.parse_override(f"key={text}").value()


@pytest.fixture(scope="module")
def composed():
    return compose_config(conf_dir=CONF)


@pytest.mark.parametrize("key", NUMERIC)
def test_every_bad_value_of_every_numeric_key_is_one_sentence_naming_it(composed, key, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    original = OmegaConf.select(composed, key)
    rule = RULES[key]
    try:
        for text in BAD_ALWAYS + MAYBE:
            value = hydra_value(text)
            if key == "optimizer.betas" and text not in ("abc", "true"):
                value = [0.9, value]  # one bad member of the pair
            OmegaConf.update(composed, key, value, merge=False)
            found = problems(composed, conf_dir=CONF)
            # Refused: what no numeric key takes, an int beyond 64 bits, and what the table refuses
            # (its rule of the key, or a rule across keys such as tokenizer.vocab_size's floor).
            if text in BAD_ALWAYS or text == MAYBE[2] and rule.kind == "int" or range_problems(composed):
                assert len(found) == 1, (key, text, found)
                assert found[0].startswith(f"{key}=") and "\n" not in found[0], (key, text, found)
                if rule.problem(key, value):
                    with pytest.raises(LmforgeError, match="^" + key.replace(".", r"\.") + "="):
                        check_setting(key, value)
            else:  # a value the table takes: no other check may refuse it
                assert found == [], (key, text, found)
    finally:
        OmegaConf.update(composed, key, original, merge=False)
    assert not list(tmp_path.iterdir())  # no MLflow store, nothing at all written


@pytest.mark.parametrize("key, text", [("optimizer.lr", "1e300"), ("evaluate.temperature", "1e300"),
                                       ("data.val_fraction", "1e300"), ("model.dropout", "1.0")])
def test_a_huge_value_is_refused_only_above_a_bound(key, text):
    bounded = RULES[key].high is not None
    assert (RULES[key].problem(key, hydra_value(text)) is not None) == bounded


def test_the_sentences():
    assert RULES["data.val_fraction"].problem("data.val_fraction", 1.5) == \
        "data.val_fraction=1.5 must be in (0, 1) (e.g. 0.1)."
    assert RULES["optimizer.lr"].problem("optimizer.lr", -1) == "optimizer.lr=-1 must be a positive number."
    assert RULES["optimizer.lr"].problem("optimizer.lr", math.inf) == \
        "optimizer.lr=inf is not a finite number; it must be a positive number."
    assert RULES["seed"].problem("seed", 2**32) == "seed=4294967296 must be an integer in [0, 4294967295]."
    assert RULES["train.max_steps"].problem("train.max_steps", 2**63).startswith(
        "train.max_steps=9223372036854775808 does not fit in 64 bits")
    assert RULES["trainer.devices"].problem("trainer.devices", "auto") is None
    assert RULES["trainer.devices"].problem("trainer.devices", "all") == \
        "trainer.devices='all' must be a positive integer or auto (auto means every visible device)."
    assert RULES["model.n_kv_head"].problem("model.n_kv_head", None) is None
    assert RULES["optimizer.betas"].problem("optimizer.betas", [0.9, 1.0]) == \
        "optimizer.betas=[0.9, 1.0] must be a list of 2 numbers, each in [0, 1)."


def test_the_vocabulary_floor_of_each_tokenizer_kind():
    assert "at least 257 (256 byte tokens plus 1 special token)" in vocab_size_problem("bpe", 200, ["<|endoftext|>"])
    assert vocab_size_problem("bpe", 257, ["<|endoftext|>"]) is None
    assert "needs at least 5" in vocab_size_problem("word", 4, ["<pad>", "<unk>", "<bos>", "<eos>"])
    assert vocab_size_problem("char", None, ["<unk>"]) is None
    assert "no size" in vocab_size_problem("bpe", None, [])


@pytest.mark.parametrize("overrides, sentence", [
    (["tokenizer=bpe", "tokenizer.vocab_size=200"], "tokenizer.vocab_size=200 is too small: byte-level BPE needs"),
    (["optimizer.min_lr_ratio=1.5"], "optimizer.min_lr_ratio=1.5 must be in [0, 1]"),
    (["data.val_fraction=1.5"], "data.val_fraction=1.5 must be in (0, 1)"),
])
def test_the_issue_20_values_are_refused(overrides, sentence):
    found = problems(compose_config(overrides, conf_dir=CONF), conf_dir=CONF)
    assert len(found) == 1 and found[0].startswith(sentence), found


def test_the_table_prints_as_markdown():
    table = rules_table()
    assert table.splitlines()[:2] == ["| key | takes |", "| --- | --- |"]
    assert "| `data.val_fraction` | in (0, 1) (e.g. 0.1) |" in table
    assert len(table.splitlines()) == len(RULES) + 2


def test_the_configuration_page_shows_the_table_as_it_is():
    from lmforge.config.rules import rules_table
    from tests.helpers import ROOT

    assert rules_table().rstrip() in (ROOT / "docs/configuration.md").read_text(encoding="utf-8")
