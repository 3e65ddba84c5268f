"""A model's reply to a conversation: its chat template, the ids that end its turn, and the reply.

The template is the one the model directory carries (``chat_template.jinja``, written by the vocab
stage and copied with the tokenizer; or config.json's ``chat_template``), rendered by
``lmforge.tokenization.chat`` exactly as in training. A model trained on plain text has none: it
gets the plain template (``role: content`` lines, then ``assistant:``) and the stop string
``"\\nuser:"``, so it does not write the user's next turn. ``lmforge generate --chat``, the
evaluate stage's samples and ``lmforge serve`` all take their prompt ids and stops from here.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from lmforge.inference.generation import refuse_unknown, stream_ids
from lmforge.inference.sampling import SamplingConfig
from lmforge.tokenization.chat import PLAIN_STOP, PLAIN_TEMPLATE, ChatEncoder, ChatTemplate


@dataclass
class ModelChat:
    """How a loaded model chats: ``encoder`` (template + tokenizer), ``name`` ("model" or "plain"),
    the stop strings and the ids that end a reply; ``loaded``, the model directory."""

    encoder: ChatEncoder
    name: str
    stop: list
    loaded: object = None

    @property
    def stop_ids(self) -> list[int]:
        return self.encoder.stop_ids

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The ids a reply to ``messages`` continues (LmforgeError when the template refuses them, or a
        character model does not know one of their characters)."""
        ids = self.encoder.prompt(messages)
        if self.loaded is not None:
            refuse_unknown(self.loaded, "".join(m["content"] for m in messages), ids)
        return ids


def model_chat(loaded) -> ModelChat:
    """The ``ModelChat`` of a loaded model directory (``lmforge.model.directory.ModelDir``)."""
    template = loaded.chat_template()
    if template is None and isinstance(loaded.config.get("chat_template"), str):
        template = ChatTemplate(loaded.config["chat_template"])
    if template is None:
        return ModelChat(ChatEncoder(loaded.tokenizer, ChatTemplate(PLAIN_TEMPLATE, origin="plain"), loaded.eot_id),
                         "plain", [PLAIN_STOP], loaded)
    return ModelChat(ChatEncoder(loaded.tokenizer, template, loaded.eot_id), "model", [], loaded)


def stream_reply(loaded, messages: list[dict], cfg: SamplingConfig, chat: ModelChat | None = None) -> Iterator[str]:
    """The assistant's reply to ``messages`` in pieces, as they become final."""
    chat = chat or model_chat(loaded)
    return stream_ids(loaded, chat.prompt_ids(messages), cfg, chat.stop, chat.stop_ids)


def reply(loaded, messages: list[dict], cfg: SamplingConfig, chat: ModelChat | None = None) -> str:
    """The assistant's whole reply to ``messages``."""
    return "".join(stream_reply(loaded, messages, cfg, chat))
