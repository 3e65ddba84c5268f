"""The prompts the evaluate stage's samples start from (for records, ``record_prompts``):
``data.prompts`` when the data config brings them (``conf/data/shakespeare.yaml``: ``**ROMEO**``
and friends), else the first words of a few validation documents (``prompts_from_text``), the same on every run.
"""

from __future__ import annotations

import re
from pathlib import Path

from lmforge.config.paths import DOC_SEPARATOR

COUNT = 3  # prompts taken from the validation text
WORDS = 4  # words each
READ_BYTES = 1 << 20  # of val.txt: the prompts come from its beginning
_FIRST_WORDS = re.compile(rf"\S+(?:[ \t]+\S+){{0,{WORDS - 1}}}")


def stage_prompts(cfg) -> list[str]:
    """``data.prompts`` when set (a list; empty: no samples), else ``prompts_from_text`` of the
    validation split in ``paths.prepared``."""
    prompts = cfg.data.get("prompts")
    if prompts is not None:
        return [str(p) for p in prompts]
    with open(Path(cfg.paths.prepared) / "val.txt", "rb") as f:
        text = f.read(READ_BYTES).decode("utf-8", errors="ignore")  # the cut may split a character
    return prompts_from_text(text, cut_mid_text=cfg.data.split == "position")


def prompts_from_text(text: str, count: int = COUNT, cut_mid_text: bool = False) -> list[str]:
    """The first words (up to ``WORDS``, on one line) of the first ``count`` documents of ``text``
    (documents separated by ``DOC_SEPARATOR``), without repeats.

    ``cut_mid_text``: the text starts wherever a split by position cut it, and is one document;
    its paragraphs (after blank lines), but the first, stand in for documents. Lines stand in when
    there are too few of either.
    """
    documents = text.split(DOC_SEPARATOR)
    if cut_mid_text:
        documents = re.split(r"\n[ \t]*\n", documents[0])[1:]
    prompts = _first_words(documents, count)
    if len(prompts) < count:
        lines = text.replace(DOC_SEPARATOR, "\n").split("\n")
        prompts += _first_words(lines[1:] if cut_mid_text else lines, count - len(prompts), prompts)
    return prompts


def _first_words(pieces: list[str], count: int, taken: list[str] | None = None) -> list[str]:
    prompts: list[str] = []
    taken = taken or []
    for piece in pieces if count > 0 else ():
        match = _FIRST_WORDS.search(piece)
        if match and match[0] not in prompts and match[0] not in taken:
            prompts.append(match[0])
            if len(prompts) == count:
                break
    return prompts


def record_prompts(cfg, fmt: str) -> list:
    """The evaluate stage's prompts for records: for chat, conversations (lists of messages) of one
    user turn each, ``evaluate.chat_prompts`` or else the turns up to the first user message of the
    first ``COUNT`` validation records; for prompt_completion, the first validation prompts."""
    from lmforge.tokenization.chunks import iter_records

    given = cfg.evaluate.get("chat_prompts")
    if fmt == "chat" and given is not None:
        return [[{"role": "user", "content": str(p)}] for p in given]
    prompts = []
    for record in iter_records(cfg.paths.prepared, "val"):
        if fmt == "chat":
            messages = record["messages"]
            first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
            if first_user is not None:
                prompts.append(messages[: first_user + 1])
        else:
            prompts.append(record["prompt"])
        if len(prompts) == COUNT:
            break
    return prompts
