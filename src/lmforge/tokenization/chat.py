"""Chat templates: a conversation to token ids and its assistant mask, the one rendering that the
tokenize stage, evaluation, ``lmforge generate --chat``, ``lmforge serve`` and export all use.

A template is Jinja text, rendered as ``transformers`` renders ``chat_template`` (a sandbox with
``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``, ``raise_exception``, ``tojson``,
``strftime_now``, the tokenizer's special-token strings as ``bos_token``, ``eos_token`` ...), and
the text is encoded whole with ``add_special_tokens=False``: the ids are exactly those of
``AutoTokenizer.apply_chat_template(messages, tokenize=True)``. Where a base model has no template,
ChatML is used and its two special tokens are added to the tokenizer (``add_chatml_tokens``).

The assistant mask marks the tokens of each assistant message's own part of the text: from where
the conversation up to it, rendered with ``add_generation_prompt=True``, ends, to where the
conversation through it ends (its end-of-turn token included, so the model learns to stop).
Templates that do not render prefixes of a conversation as prefixes of its text fall back to the
span of the message's content. It knows nothing of files of records or of packing
(``lmforge.tokenization.packing``).

Files: a tokenizer directory (``paths.vocab``, every model directory) carries the template as
``chat_template.jinja`` and ``chat.json`` (where it came from, the tokens added, the special-token
strings it renders with); a transformers directory as ``tokenizer_config.json``'s ``chat_template``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from lmforge.errors import LmforgeError

# transformers' former default template, the one Qwen and others ship.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>'"
    " + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
# For a model trained on plain text: what `lmforge serve` has always sent such a model, with a stop string.
PLAIN_TEMPLATE = ("{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\\n' }}"
                  "{% endfor %}{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}")
PLAIN_STOP = "\nuser:"
TEMPLATE_FILE = "chat_template.jinja"
CHAT_META = "chat.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
RENDER_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


@dataclass
class ChatTemplate:
    """A chat template: its Jinja ``source``, the special-token strings it renders with, and where
    it came from (``base``: the base model's own, ``chatml``, or ``plain``)."""

    source: str
    tokens: dict = field(default_factory=dict)
    origin: str = "base"
    added_tokens: list = field(default_factory=list)

    def text(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The rendered conversation (LmforgeError naming the template's complaint)."""
        try:
            return _compiled(self.source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                 **self.tokens)
        except Exception as err:  # a template is user code: any failure is about it and these messages
            raise LmforgeError(f"the chat template failed on these messages ({type(err).__name__}: {err}); "
                               "fix the messages or the model's chat_template.") from None


def chatml(eos_token: str | None = None) -> ChatTemplate:
    """ChatML, for a tokenizer that ``add_chatml_tokens`` gave its two tokens."""
    return ChatTemplate(CHATML_TEMPLATE, {"eos_token": eos_token or CHATML_TOKENS[1]}, "chatml")


@lru_cache(maxsize=16)
def _compiled(source: str):
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        from datetime import datetime

        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    # transformers' {% generation %} marks (assistant spans for its own masks) render their body as is.
    source = source.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as err:
        raise LmforgeError(f"the chat template is not valid Jinja ({err}); fix chat_template.") from None


# --- conversation -> ids and mask ---------------------------------------------------------------


class ChatEncoder:
    """Conversations to ids with ``template`` and a ``tokenizers.Tokenizer``; knows the ids that end
    an assistant turn (``stop_ids``: the special tokens of a probe reply's end, and ``eot_id``)."""

    def __init__(self, tokenizer, template: ChatTemplate, eot_id: int | None = None):
        self.tokenizer, self.template = tokenizer, template
        special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
        probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
        ids, mask = self.encode(probe) if template.origin != "plain" else ([], [])
        ends = {i for i, m in zip(ids, mask) if m and tokenizer.id_to_token(i) in special}
        self.stop_ids = sorted(ends | ({eot_id} if eot_id is not None else set()))

    def encode(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
        """(ids of the rendered conversation, True for each assistant token)."""
        text = self.template.text(messages, add_generation_prompt)
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        spans = assistant_spans(self.template, messages, text)
        mask = [any(start <= begin < end for start, end in spans) for begin, _ in encoding.offsets]
        return list(encoding.ids), mask

    def prompt(self, messages: list[dict]) -> list[int]:
        """The ids a reply continues: the conversation and the assistant's header."""
        return list(self.tokenizer.encode(self.template.text(messages, True), add_special_tokens=False).ids)


def render_chat(messages: list[dict], tokenizer, template: ChatTemplate,
                add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
    """The ids and assistant mask of ``messages`` (see ``ChatEncoder.encode``)."""
    return ChatEncoder(tokenizer, template).encode(messages, add_generation_prompt)


def assistant_spans(template: ChatTemplate, messages: list[dict], text: str) -> list[tuple[int, int]]:
    """Character spans of ``text`` (the whole conversation rendered) that each assistant message owns."""
    spans, searched = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        try:
            header = template.text(messages[:i], True)  # the assistant's header included
            through = template.text(messages[: i + 1], False)
            if not (text.startswith(header) and text.startswith(through) and len(header) <= len(through)):
                raise ValueError
            start, end = len(header), len(through)
        except (LmforgeError, ValueError):  # not incremental: the content's own span
            start = text.find(message["content"], searched)
            if start < 0:
                raise LmforgeError("the chat template does not reproduce an assistant message's text, so its "
                                   "tokens cannot be found for the loss mask; use a template that does.") from None
            end = start + len(message["content"])
        spans.append((start, end))
        searched = end
    return spans


# --- tokens and files ----------------------------------------------------------------------------


def add_chatml_tokens(tokenizer) -> list[str]:
    """Add ChatML's special tokens to ``tokenizer`` (a ``tokenizers.Tokenizer``) where missing;
    return those added (their ids follow the existing ones, so the embeddings grow at the end)."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    missing = [t for t in CHATML_TOKENS if t not in vocab]
    if missing:
        from tokenizers import AddedToken

        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    return missing


def template_for(tokenizer, base_dir: str | Path | None = None) -> ChatTemplate:
    """The chat template to train ``tokenizer`` with: the base's own (``base_dir``: a model or
    transformers directory with a template), else ChatML, whose tokens are then added to ``tokenizer``
    (``added_tokens`` lists them: the trainer must grow the embeddings by as many rows)."""
    template = load_chat(base_dir) if base_dir is not None else None
    if template is None:
        template = chatml()
        template.added_tokens = add_chatml_tokens(tokenizer)
    return template


def save_chat(directory: str | Path, template: ChatTemplate) -> None:
    """Write ``chat_template.jinja`` and ``chat.json`` into ``directory``."""
    from lmforge.outputs import write_json, write_text

    directory = Path(directory)
    write_text(directory / TEMPLATE_FILE, template.source)
    write_json(directory / CHAT_META, {"origin": template.origin, "tokens": template.tokens,
                                       "added_tokens": list(template.added_tokens)})


def load_chat(directory: str | Path) -> ChatTemplate | None:
    """The chat template a directory carries: lmforge's ``chat_template.jinja`` (+ ``chat.json``), or
    a transformers directory's (``chat_template.jinja`` or ``tokenizer_config.json``'s key); None."""
    directory = Path(directory)
    meta = _json(directory / CHAT_META) or {}
    hf_config = _json(directory / TOKENIZER_CONFIG) or {}
    tokens = meta.get("tokens") or _render_tokens(hf_config)
    if (directory / TEMPLATE_FILE).is_file():
        source = (directory / TEMPLATE_FILE).read_text(encoding="utf-8")
    else:
        source = hf_config.get("chat_template")
        if isinstance(source, list):  # named templates: the default one
            source = next((t.get("template") for t in source if isinstance(t, dict) and t.get("name") == "default"),
                          None)
        if not isinstance(source, str):
            return None
    return ChatTemplate(source, tokens, meta.get("origin", "base"), meta.get("added_tokens", []))


def template_and_ends(directory: str | Path, tokenizer, eot_id: int) -> tuple[ChatTemplate | None, list[int]]:
    """For export: the chat template of a model directory (or None) and the ids that end generation,
    the end-of-text id first, then the template's end of turn (``<|im_end|>`` for ChatML)."""
    template = load_chat(directory)
    if template is None:
        return None, [eot_id]
    ends = ChatEncoder(tokenizer, template, eot_id).stop_ids
    return template, [eot_id, *(i for i in ends if i != eot_id)]


def _render_tokens(hf_config: dict) -> dict:
    tokens = {}
    for name in RENDER_TOKENS:
        value = hf_config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            tokens[name] = value
    return tokens


def _json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise LmforgeError(f"{path} is not valid JSON; fix or delete it.") from None
    return value if isinstance(value, dict) else None
