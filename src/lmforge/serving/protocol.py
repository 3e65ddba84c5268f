"""The OpenAI HTTP API's request and response shapes, for ``lmforge.serving.server``.

Owns: reading a /v1/completions or /v1/chat/completions body into a validated ``Ask`` (every bad
value is an ``ApiError`` naming its field), rendering chat messages into a prompt, and the JSON
of answers, stream chunks and errors. It knows nothing of sockets or of the engine's threads.

Chat templates. A model directory may carry ``chat_template.jinja`` (or a ``chat_template`` key
in config.json, as transformers writes it): a Jinja template rendered with ``messages``,
``add_generation_prompt=True``, ``eos_token`` and ``bos_token`` (sandboxed). Without one, the
plain template is used: one line ``<role>: <content>`` per message, then ``assistant:``; it adds
the stop string ``"\\nuser:"`` so a base model does not write the user's next turn. Every chat
answer names the template it used in ``lmforge.chat_template`` ("model" or "plain").
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field

from lmforge.config.values import is_int
from lmforge.errors import ConfigError
from lmforge.inference.generation import SamplingConfig

PLAIN_TEMPLATE_STOP = "\nuser:"
# Fields clients send that change nothing here, accepted when they hold their no-op value.
_NO_OP = {"user": None, "logit_bias": None, "presence_penalty": 0, "frequency_penalty": 0, "echo": False,
          "suffix": None, "best_of": None, "metadata": None, "store": False, "service_tier": None,
          "parallel_tool_calls": None, "response_format": None}
_COMMON = {"model", "stream", "stream_options", "n", "max_tokens", "temperature", "top_p", "top_k",
           "repetition_penalty", "seed", "stop", "logprobs", "ignore_eos"}
_FIELDS = {"completion": _COMMON | {"prompt"},
           "chat": _COMMON | {"messages", "max_completion_tokens", "top_logprobs"}}
# SamplingConfig's names -> the request's.
_FIELD_OF = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
             "repetition_penalty": "repetition_penalty", "seed": "seed"}


class ApiError(Exception):
    """A request the server refuses: HTTP ``status`` with OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        """``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Ask:
    """A validated request: what to sample and how to answer."""

    kind: str  # "completion" or "chat"
    prompt: str
    sampling: SamplingConfig
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
    logprobs: bool = False
    ignore_eos: bool = False  # vLLM's extra field: go on past the end-of-text token
    chat_template: str | None = None  # "model" or "plain" for chat


def bad(param: str, message: str) -> ApiError:
    """A 400 naming ``param``."""
    return ApiError(400, message, param=param, code="invalid_value")


def parse_ask(body, kind: str, model_name: str, max_batch: int, chat_template: str | None) -> Ask:
    """Validate a request ``body`` (parsed JSON) of ``kind`` "completion" or "chat"; raise ApiError."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object.", code="invalid_json")
    _check_fields(body, kind)
    model = body.get("model")
    if not isinstance(model, str):
        raise bad("model", f"'model' is required: a string, the served model's name {model_name!r}.")
    if model != model_name:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {model_name!r}.",
                       param="model", code="model_not_found")
    ask = Ask(kind=kind, prompt="", sampling=SamplingConfig())
    ask.n = _int(body, "n", 1, 1, max_batch)
    ask.stream = _bool(body, "stream")
    ask.ignore_eos = _bool(body, "ignore_eos")
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
            raise bad("stream_options", "'stream_options' must be an object like {\"include_usage\": true}.")
        ask.include_usage = bool(options.get("include_usage"))
    ask.stop = _stop(body.get("stop"))
    if kind == "completion":
        ask.prompt = _prompt(body.get("prompt"))
        logprobs = body.get("logprobs")
        if logprobs is not None and (not is_int(logprobs) or not 0 <= logprobs <= 5):
            raise bad("logprobs", f"'logprobs' must be an integer from 0 to 5 or null, not {logprobs!r}.")
        ask.logprobs = logprobs is not None
        default_max = 16  # OpenAI's default for completions
    else:
        ask.logprobs = _bool(body, "logprobs")
        top = body.get("top_logprobs")
        if top not in (None, 0):
            raise bad("top_logprobs", "'top_logprobs' is not supported: only the chosen tokens' logprobs are returned.")
        ask.prompt, ask.chat_template = render_chat(body.get("messages"), chat_template)
        if ask.chat_template == "plain":
            ask.stop.append(PLAIN_TEMPLATE_STOP)
        default_max = None
        if body.get("max_completion_tokens") is not None:
            body = {**body, "max_tokens": body["max_completion_tokens"]}
    ask.sampling = _sampling(body, default_max)
    return ask


def _check_fields(body: dict, kind: str) -> None:
    for key, value in body.items():
        if key in _FIELDS[kind]:
            continue
        if key in _NO_OP:
            if value in (_NO_OP[key], None) or (key == "best_of" and value == body.get("n", 1)):
                continue
            raise bad(key, f"'{key}'={value!r} is not supported by this server; leave it out.")
        raise bad(key, f"'{key}' is not a field of this endpoint; sampling extras are top_k and repetition_penalty.")


def _sampling(body: dict, default_max: int | None) -> SamplingConfig:
    values = {}
    for ours, theirs in _FIELD_OF.items():
        if body.get(theirs) is not None:
            values[ours] = body[theirs]
    values.setdefault("max_new_tokens", default_max or 256)
    sampling = SamplingConfig(**values)
    try:
        sampling.validate()
    except ConfigError as err:
        name = re.match(r"sampling\.(\w+)=", str(err))
        param = _FIELD_OF.get(name.group(1), name.group(1)) if name else None
        message = str(err).replace(f"sampling.{name.group(1)}", f"'{param}'") if name else str(err)
        raise bad(param, message) from None
    return sampling


def _prompt(prompt) -> str:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad("prompt", "'prompt' must be a string (one prompt per request; use n for several samples).")
    return prompt


def _stop(stop) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise bad("stop", "'stop' must be a string or a list of up to 4 strings.")
    return [s for s in stop if s]


def _int(body: dict, name: str, default: int, low: int, high: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if not is_int(value) or not low <= value <= high:
        raise bad(name, f"'{name}' must be an integer from {low} to {high}, not {value!r}.")
    return value


def _bool(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(name, f"'{name}' must be true or false, not {value!r}.")
    return value


def render_chat(messages, template: str | None) -> tuple[str, str]:
    """The prompt for chat ``messages`` and the template used ("model" or "plain")."""
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "'messages' must be a non-empty list of {\"role\", \"content\"} objects.")
    plain = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise bad(f"messages[{i}]", f"messages[{i}] must be an object with a string 'role'.")
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text is understood
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise bad(f"messages[{i}].content", "only text content parts are supported.")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content", f"messages[{i}].content must be a string.")
        plain.append({"role": message["role"], "content": content})
    if template is None:
        return "".join(f"{m['role']}: {m['content']}\n" for m in plain) + "assistant:", "plain"
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        text = ImmutableSandboxedEnvironment().from_string(template).render(
            messages=plain, add_generation_prompt=True, bos_token="", eos_token="")
    except Exception as err:  # a template error is about the model directory, but the request can't be served
        raise ApiError(400, f"the model's chat template failed on these messages: {err}", param="messages") from None
    return text, "model"


# --- Answers ------------------------------------------------------------------------------------


def new_id(kind: str) -> str:
    """An answer id: ``cmpl-...`` or ``chatcmpl-...``."""
    return ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def logprobs_block(ask: Ask, tokens: list[str], logprobs: list[float], offset: int = 0) -> dict | None:
    """The ``logprobs`` of a choice or chunk for the chosen ``tokens`` (None when not asked)."""
    if not ask.logprobs:
        return None
    if ask.kind == "chat":
        return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8")), "top_logprobs": []}
                            for t, lp in zip(tokens, logprobs)]}
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": None, "text_offset": offsets}


def choice(ask: Ask, index: int, text: str, finish_reason: str | None, logprobs: dict | None,
           chunk: bool = False) -> dict:
    """One entry of ``choices``: of an answer, or (``chunk``) of a stream chunk."""
    if ask.kind == "completion":
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    if chunk:
        delta = {"content": text} if text else {}
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": finish_reason}


def envelope(ask: Ask, answer_id: str, model: str, choices: list[dict], chunk: bool = False,
             extra: dict | None = None) -> dict:
    """An answer or a stream chunk around ``choices``."""
    if ask.kind == "completion":
        obj = "text_completion"
    else:
        obj = "chat.completion.chunk" if chunk else "chat.completion"
    out = {"id": answer_id, "object": obj, "created": int(time.time()), "model": model,
           "system_fingerprint": None, "choices": choices}
    if extra:
        out.update(extra)
    return out
