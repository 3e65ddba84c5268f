"""The range of every numeric setting: one table, ``RULES``, and the few rules across keys.

``lmforge check``, every stage (``lmforge.stages.check``, before it does any work), the library
functions that read a setting themselves (``corpus.stage``, ``tokenization.vocab``,
``model.config``) and a ``key=value`` override (``config.compose``) all ask this module, so a value
is refused by all of them or by none, in the same sentence.

A rule says the type (an integer, a number, a list of numbers), the bounds and whether each bound is
allowed, whether null is allowed, and the words a number key also takes (``trainer.devices=auto``).
Whatever the bounds, a number must be finite and an integer must fit in 64 bits. Every numeric key
of ``conf/`` has a rule (``tests/unit/test_rules.py`` walks ``conf/**/*.yaml`` to hold it so);
``python -m lmforge.config.rules`` prints the table as Markdown.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf

from lmforge.config.values import is_int, is_list, is_number
from lmforge.errors import LmforgeError

INT64_MAX = 2**63 - 1
SEED_MAX = 2**32 - 1  # numpy's and Lightning's seed_everything's range
BYTE_TOKENS = 256  # byte-level BPE starts from one token per byte value


@dataclass(frozen=True)
class Rule:
    """The values one key takes. ``low``/``high``: bounds (None: none), each allowed unless
    ``low_open``/``high_open``; ``null``: None is allowed; ``words``: strings also allowed;
    ``length``: how many numbers a ``numbers`` list holds; ``note``: what a value means."""

    kind: str  # "int", "number" or "numbers" (a list of numbers, each in the bounds)
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    null: bool = False
    words: tuple[str, ...] = ()
    length: int | None = None
    note: str = ""

    def requirement(self) -> str:
        """What the rule asks, in words: ``a positive integer or null (null means n_head)``."""
        if self.kind == "numbers":
            text = f"a list of {self.length} numbers, each {self._bounds() or 'finite'}"
        elif self.kind == "int":
            text = {(1, None): "a positive integer", (0, None): "an integer >= 0"}.get(
                (self.low, self.high), f"an integer {self._bounds()}".rstrip())
        elif (self.low, self.low_open, self.high) == (0, True, None):
            text = "a positive number"
        elif self.low is not None and self.high is not None:
            text = self._bounds()  # "in [0, 1)": the words of the model's and the sampling settings' checks
        else:
            text = f"a number {self._bounds()}".rstrip()
        text += "".join(f" or {word}" for word in self.words) + (" or null" if self.null else "")
        return text + (f" ({self.note})" if self.note else "")

    def _bounds(self) -> str:
        low, high = _shown_bound(self.low), _shown_bound(self.high)
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {low}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {high}"
        return ""

    def problem(self, key: str, value: Any) -> str | None:
        """One sentence naming ``key``, ``value`` and what the rule asks; None when it takes ``value``."""
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
        if value is None and self.null or isinstance(value, str) and value in self.words:
            return None
        if self.kind == "numbers" and not (is_list(value) and len(value) == self.length):
            return f"{key}={value!r} must be {self.requirement()}."
        for item in value if self.kind == "numbers" else [value]:
            why = self._why_not(item)
            if why:
                return f"{key}={value!r} {why} {self.requirement()}."
        return None

    def _why_not(self, x: Any) -> str | None:
        if not (is_int(x) if self.kind == "int" else is_number(x)):
            return "must be"
        if self.kind == "int" and abs(x) > INT64_MAX:
            return "does not fit in 64 bits; it must be"
        if not _finite(x):
            return "is not a finite number; it must be"
        return None if self._within(x) else "must be"

    def _within(self, x: float) -> bool:
        if self.low is not None and (x < self.low or self.low_open and x == self.low):
            return False
        return self.high is None or not (x > self.high or self.high_open and x == self.high)


def _finite(x: float) -> bool:
    try:
        return math.isfinite(x)
    except OverflowError:  # an int beyond any float
        return False


def _shown_bound(bound: float | None) -> str:
    return "" if bound is None else str(int(bound)) if float(bound).is_integer() else repr(bound)


def integer(low: int | None = 1, high: int | None = None, *, null: bool = False, words: tuple[str, ...] = (),
            note: str = "") -> Rule:
    """An integer in ``[low, high]`` (a positive integer by default)."""
    return Rule("int", low, high, null=null, words=words, note=note)


def number(low: float | None = None, high: float | None = None, *, low_open: bool = False, high_open: bool = False,
           null: bool = False, note: str = "") -> Rule:
    """A finite number between ``low`` and ``high`` (each allowed unless ``*_open``)."""
    return Rule("number", low, high, low_open, high_open, null=null, note=note)


POSITIVE = number(0, low_open=True)
FRACTION = number(0, 1, high_open=True)  # [0, 1): dropout, momentum, Adam's betas

# One line per key. Where zero, null or a huge value is legitimate, the rule says so.
RULES: dict[str, Rule] = {
    "seed": integer(0, SEED_MAX),
    "train.max_steps": integer(),
    "train.batch_size": integer(),
    "train.global_batch_tokens": integer(null=True, note="null means one micro-batch per device"),
    "train.eval_interval": integer(),
    "train.eval_iters": integer(),
    "train.log_every": integer(),
    "train.grad_clip": number(0, null=True, note="0 or null means no clipping"),
    "train.checkpoint_every": integer(),
    "train.early_stopping_patience": integer(null=True, note="null means never stop early"),
    "evaluate.batch_size": integer(),
    "evaluate.max_batches": integer(null=True, note="null means the whole validation split"),
    "evaluate.max_new_tokens": integer(),
    "evaluate.temperature": number(0, note="0 means greedy"),
    "evaluate.top_k": integer(null=True, note="null means no top-k cut"),
    "evaluate.top_p": number(0, 1, low_open=True, null=True, note="null means no nucleus cut"),
    "evaluate.seed": integer(0, SEED_MAX),
    "data.min_chars": integer(0),
    "data.val_fraction": number(0, 1, low_open=True, high_open=True, note="e.g. 0.1"),
    "data.shard_size": integer(note="bytes per token shard"),
    "data.workers": integer(null=True, note="null means every core, or the cluster's CPUs"),
    "tokenizer.vocab_size": integer(null=True, note="null means the alphabet, for tokenizer=char only"),
    "tokenizer.min_frequency": integer(0),
    "tokenizer.train_bytes": integer(null=True, note="null means the whole train split"),
    "model.vocab_size": integer(note="the tokenizer's vocabulary size"),  # not in conf/: a model directory's
    "model.block_size": integer(),
    "model.n_layer": integer(),
    "model.n_head": integer(),
    "model.n_embd": integer(),
    "model.n_kv_head": integer(null=True, note="null means n_head"),
    "model.dropout": FRACTION,
    "model.rope_theta": POSITIVE,
    "model.norm_eps": POSITIVE,
    "model.mlp_hidden": integer(null=True, note="null means the default width"),
    "model.logit_softcap": number(0, low_open=True, null=True, note="null means no cap"),
    "optimizer.lr": POSITIVE,
    "optimizer.min_lr_ratio": number(0, 1, note="the floor of the schedule, as a fraction of each learning rate"),
    "optimizer.weight_decay": number(0),
    "optimizer.betas": Rule("numbers", 0, 1, high_open=True, length=2),
    "optimizer.eps": POSITIVE,
    "optimizer.warmup_steps": integer(0),
    "optimizer.cooldown_fraction": number(0, 1, note="the share of the steps that schedule=wsd decays over"),
    "optimizer.embedding_lr": number(0, low_open=True, null=True, note="null means optimizer.lr"),
    "optimizer.muon_lr": POSITIVE,
    "optimizer.muon_momentum": FRACTION,
    "optimizer.muon_weight_decay": number(0),
    "optimizer.muon_ns_steps": integer(1, 20, note="Newton-Schulz iterations per Muon step"),
    "optimizer.muon_normuon_beta2": number(0, 1, high_open=True, null=True, note="null means NorMuon off"),
    "finetune.lora.r": integer(note="the adapters' rank"),
    "finetune.lora.alpha": POSITIVE,
    "finetune.lora.dropout": FRACTION,
    "finetune.lora.lr": POSITIVE,
    "trainer.devices": integer(words=("auto",), note="auto means every visible device"),
    "trainer.num_nodes": integer(),
    "trainer.num_threads": integer(null=True, words=("auto",),
                                   note="auto: measured on this model's step; null: torch's default"),
}

# Keys that every file of conf/ sets to null and that take no number (a path, a name, an address):
# the walk of conf/ in tests/unit/test_rules.py cannot tell them from a number key left null.
NOT_NUMBERS = ("train.init_from", "tracking.run_name", "data.ray_address", "evaluate.chat_prompts", "finetune.base",
               "finetune.revision")


def names(sentence: str, key: str) -> bool:
    """Whether ``sentence`` names the dotted ``key`` (``model.n_head``, not ``model.n_head_x``)."""
    return re.search(rf"(?<![\w.]){re.escape(key)}(?!\w)", sentence) is not None


def problem(key: str, value: Any) -> str | None:
    """The sentence refusing ``value`` for ``key`` (None when its rule takes it, or it has none)."""
    rule = RULES.get(key)
    return rule.problem(key, value) if rule else None


def check_setting(key: str, value: Any) -> Any:
    """``value`` when the rule of ``key`` takes it; LmforgeError with the rule's sentence otherwise."""
    found = problem(key, value)
    if found:
        raise LmforgeError(found)
    return value


def checked(cfg: Any, key: str) -> Any:
    """The value of dotted ``key`` in the config ``cfg``, refused (LmforgeError) when out of range."""
    return check_setting(key, OmegaConf.select(cfg, key))


# --- Rules across keys -------------------------------------------------------------------------


def vocab_size_problem(kind: str, vocab_size: Any, special_tokens: list[str]) -> str | None:
    """``tokenizer.vocab_size`` must leave room for what a ``kind`` of vocabulary holds besides its
    ``special_tokens``: the 256 byte tokens of byte-level BPE, at least one word or character.
    (A character vocabulary's size is checked against its alphabet once the vocab stage knows it.)"""
    n = len(special_tokens)
    specials = f"{n} special token{'s' * (n != 1)}"
    if kind == "bpe":
        minimum = BYTE_TOKENS + n
        what = f"byte-level BPE needs at least {minimum} ({BYTE_TOKENS} byte tokens plus {specials})"
    elif kind in ("word", "char"):
        minimum, what = n + 1, f"a {kind} vocabulary needs at least {n + 1} (room after its {specials})"
    else:
        return None
    if vocab_size is None:
        if kind == "char":
            return None
        return (f"tokenizer.vocab_size=null gives a {kind} tokenizer no size; "
                f"set tokenizer.vocab_size to {minimum} or more.")
    if vocab_size < minimum:
        return f"tokenizer.vocab_size={vocab_size} is too small: {what}; set tokenizer.vocab_size to {minimum} or more."
    return None


def check_vocab_size(kind: str, vocab_size: Any, special_tokens: list[str]) -> None:
    """LmforgeError with ``vocab_size_problem``'s sentence, if any."""
    found = vocab_size_problem(kind, vocab_size, special_tokens)
    if found:
        raise LmforgeError(found)


def _vocab_floor(cfg: Any) -> str | None:
    t = cfg.tokenizer
    specials = t.get("special_tokens")
    return vocab_size_problem(t.kind, t.get("vocab_size"), list(specials) if is_list(specials) else [])


# (the keys a rule reads, the rule): a rule runs only when each of its keys is there and in range.
CROSS_RULES: tuple[tuple[tuple[str, ...], Callable[[Any], str | None]], ...] = (
    (("tokenizer.kind", "tokenizer.vocab_size"), _vocab_floor),
)


def range_problems(cfg: Any) -> list[str]:
    """One sentence per key of ``cfg`` out of its range, then per rule across keys that fails."""
    found, bad = [], set()
    values = _flat(OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg)
    for key, rule in RULES.items():
        if key in values and (sentence := rule.problem(key, values[key])):
            found.append(sentence)
            bad.add(key)
    for keys, rule in CROSS_RULES:
        if all(k in values for k in keys) and bad.isdisjoint(keys) and (sentence := rule(cfg)):
            found.append(sentence)
    return found


def _flat(node: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_ranges(cfg: Any) -> None:
    """LmforgeError with the first of ``range_problems``, if any."""
    found = range_problems(cfg)
    if found:
        raise LmforgeError(found[0])


def rules_table() -> str:
    """The rules as a Markdown table: key, what it takes."""
    rows = [f"| `{key}` | {rule.requirement()} |" for key, rule in RULES.items()]
    return "\n".join(["| key | takes |", "| --- | --- |", *rows])


if __name__ == "__main__":
    print(rules_table())
