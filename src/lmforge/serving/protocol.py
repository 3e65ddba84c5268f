"""The OpenAI HTTP API's requests, for ``lmforge.serving.server``: every field checked at the edge.

Owns: reading a /v1/completions or /v1/chat/completions body into a validated ``Ask`` (every bad
value is an ``ApiError`` naming its field, in OpenAI's error shape), rendering chat messages into a
prompt. The sampling fields go through ``lmforge.inference.sampling.sampling_config``, the one
parser of sampling settings, so their ranges are those documented there. It knows nothing of
sockets or of the engine's threads; the answers' JSON is ``lmforge.serving.answers``.

Chat messages are rendered to ids by the model's own chat template, as in training
(``lmforge.inference.chat``: ``chat_template.jinja`` of the model directory, or for a model trained
on plain text the plain template with the stop string ``"\\nuser:"``); the template's end-of-turn
ids end the reply. Every chat answer names the template it used in ``lmforge.chat_template``
("model" or "plain").
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.config.values import is_int
from lmforge.errors import LmforgeError
from lmforge.inference.sampling import SamplingConfig, SamplingError, sampling_config
from lmforge.serving.limits import Limits

# Fields clients send that change nothing here, accepted when they hold their no-op value.
_NO_OP = {"metadata": None, "store": False, "service_tier": None, "parallel_tool_calls": None,
          "response_format": None}
_COMMON = {"model", "stream", "stream_options", "n", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
           "logprobs", "ignore_eos", "repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias",
           "user"}
_FIELDS = {"completion": _COMMON | {"prompt", "echo", "best_of", "suffix"},
           "chat": _COMMON | {"messages", "max_completion_tokens", "top_logprobs"}}
# SamplingConfig's names -> the request's.
_SAMPLING = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
             "repetition_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
             "frequency_penalty": "frequency_penalty", "seed": "seed", "logit_bias": "logit_bias"}
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 300  # entries, as OpenAI


class ApiError(Exception):
    """A request the server refuses: HTTP ``status`` with OpenAI's error object (and ``headers``)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        """``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Ask:
    """A validated request: what to sample and how to answer."""

    kind: str  # "completion" or "chat"
    prompts: list  # each a string or a list of token ids, as sent
    sampling: SamplingConfig
    n: int = 1
    best_of: int | None = None  # sample this many per prompt, answer with the n most likely
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
    logprobs: bool = False
    top_logprobs: int = 0  # alternatives per token
    echo: bool = False  # the prompt first, in the text and the logprobs
    generate: bool = True  # False: echo with max_tokens 0, the prompt's logprobs only
    ignore_eos: bool = False  # vLLM's extra field: go on past the end-of-text token
    chat_template: str | None = None  # "model" or "plain" for chat
    stop_ids: tuple = ()  # chat: the ids that end the template's assistant turn, besides end-of-text

    @property
    def samples(self) -> int:
        """Samples drawn per prompt."""
        return self.best_of or self.n


def bad(param: str, message: str) -> ApiError:
    """A 400 naming ``param``."""
    return ApiError(400, message, param=param, code="invalid_value")


def parse_ask(body, kind: str, model_name: str, limits: Limits, chat, vocab_size: int) -> Ask:
    """Validate a request ``body`` (parsed JSON) of ``kind`` "completion" or "chat"; raise ApiError.
    ``chat``: the model's ``lmforge.inference.chat.ModelChat``, which renders chat messages to ids."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object.", code="invalid_json")
    _check_fields(body, kind)
    model = body.get("model")
    if not isinstance(model, str):
        raise bad("model", f"'model' is required: a string, the served model's name {model_name!r}.")
    if model != model_name:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {model_name!r}.",
                       param="model", code="model_not_found")
    ask = Ask(kind=kind, prompts=[], sampling=SamplingConfig())
    ask.n = _int(body, "n", 1, 1, limits.max_n, "--max-n")
    ask.stream, ask.ignore_eos = _bool(body, "stream"), _bool(body, "ignore_eos")
    if not isinstance(body.get("user", ""), str):
        raise bad("user", "'user' must be a string.")
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
            raise bad("stream_options", "'stream_options' must be an object like {\"include_usage\": true}.")
        ask.include_usage = bool(options.get("include_usage"))
    ask.stop = _stop(body.get("stop"))
    if kind == "completion":
        _completion_fields(ask, body, limits, vocab_size)
        default_max = 16  # OpenAI's default for completions
    else:
        _chat_fields(ask, body, chat, limits)
        default_max = limits.max_tokens
        if body.get("max_completion_tokens") is not None:
            body = {**body, "max_tokens": body["max_completion_tokens"]}
    ask.sampling = _sampling(body, default_max, limits, ask, vocab_size)
    return ask


def _completion_fields(ask: Ask, body: dict, limits: Limits, vocab_size: int) -> None:
    ask.prompts = _prompts(body.get("prompt"), limits, vocab_size)
    logprobs = body.get("logprobs")
    if logprobs is not None and (not is_int(logprobs) or not 0 <= logprobs <= MAX_TOP_LOGPROBS):
        raise bad("logprobs", f"'logprobs' must be an integer from 0 to {MAX_TOP_LOGPROBS} or null, not {logprobs!r}.")
    ask.logprobs, ask.top_logprobs = logprobs is not None, logprobs or 0
    ask.echo = _bool(body, "echo")
    if body.get("suffix") is not None:
        raise bad("suffix", "'suffix' (text to insert before) is not supported by this server; leave it out.")
    best_of = body.get("best_of")
    if best_of is not None:
        ask.best_of = _int(body, "best_of", 1, ask.n, limits.max_n, "--max-n")
        if ask.stream and best_of != ask.n:
            raise bad("best_of", "'best_of' cannot be used with 'stream': the best samples are known only at the end.")


def _chat_fields(ask: Ask, body: dict, chat, limits: Limits) -> None:
    ask.logprobs = _bool(body, "logprobs")
    top = body.get("top_logprobs")
    if top is not None:
        if not is_int(top) or not 0 <= top <= MAX_TOP_LOGPROBS:
            raise bad("top_logprobs", f"'top_logprobs' must be an integer from 0 to {MAX_TOP_LOGPROBS}, not {top!r}.")
        if top and not ask.logprobs:
            raise bad("top_logprobs", "'top_logprobs' needs 'logprobs': true.")
        ask.top_logprobs = top
    ids, ask.chat_template = render_chat(body.get("messages"), chat, limits)
    ask.prompts = [ids]
    ask.stop.extend(chat.stop)
    ask.stop_ids = tuple(chat.stop_ids)


def _check_fields(body: dict, kind: str) -> None:
    for key, value in body.items():
        if key in _FIELDS[kind]:
            continue
        if key in _NO_OP:
            if value in (_NO_OP[key], None):
                continue
            raise bad(key, f"'{key}'={value!r} is not supported by this server; leave it out.")
        raise bad(key, f"'{key}' is not a field of this endpoint (or is not supported by this server); "
                       "sampling extras are top_k, repetition_penalty and ignore_eos.")


def _sampling(body: dict, default_max: int, limits: Limits, ask: Ask, vocab_size: int) -> SamplingConfig:
    values = {ours: body.get(theirs) for ours, theirs in _SAMPLING.items()}
    values["logit_bias"] = _logit_bias(body.get("logit_bias"), vocab_size)
    max_tokens = values["max_new_tokens"]
    if max_tokens is None:
        max_tokens = min(default_max, limits.max_tokens)
    elif not is_int(max_tokens) or not (0 if ask.echo else 1) <= max_tokens <= limits.max_tokens:
        low = "0 (with echo)" if ask.echo else "1"
        raise bad("max_tokens", f"'max_tokens' must be an integer from {low} to {limits.max_tokens} (this server's "
                  f"limit: lmforge serve --max-tokens), not {max_tokens!r}.")
    ask.generate = max_tokens > 0
    values["max_new_tokens"] = max(1, max_tokens)  # echo with max_tokens 0 samples nothing (ask.generate)
    try:
        return sampling_config(values, prefix="", names=_SAMPLING)
    except SamplingError as err:
        raise bad(err.key, str(err)) from None  # the sentence starts with the field's name


def _logit_bias(bias, vocab_size: int) -> dict[int, float] | None:
    if bias is None:
        return None
    if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS:
        raise bad("logit_bias", f"'logit_bias' must be an object of at most {MAX_LOGIT_BIAS} token ids to biases.")
    out = {}
    for key, value in bias.items():
        if not (isinstance(key, str) and key.isdigit() and int(key) < vocab_size):
            raise bad("logit_bias", f"'logit_bias' key {key!r} is not a token id of this model "
                      f"(0 to {vocab_size - 1}).")
        out[int(key)] = value
    return out


def _prompts(prompt, limits: Limits, vocab_size: int) -> list:
    """A completion's prompts: a string, a list of strings, a list of token ids, or a list of those."""
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(is_int(t) for t in prompt)):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise bad("prompt", "'prompt' must be a string, a list of strings, a list of token ids or a list of those.")
    if len(prompt) > limits.max_prompts:
        raise bad("prompt", f"{len(prompt)} prompts in one request; this server takes at most {limits.max_prompts} "
                  "(lmforge serve --max-prompts).")
    for p in prompt:
        if isinstance(p, str):
            continue
        if not isinstance(p, list) or not p or not all(is_int(t) and 0 <= t < vocab_size for t in p):
            raise bad("prompt", "each prompt must be a string or a non-empty list of token ids from 0 to "
                      f"{vocab_size - 1}.")
        if len(p) > limits.max_prompt_tokens:
            raise ApiError(400, f"a prompt has {len(p)} tokens; this server accepts at most {limits.max_prompt_tokens}"
                           " (lmforge serve --max-prompt-tokens).", param="prompt", code="context_length_exceeded")
    return prompt


def _stop(stop) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and len(s) <= 1000 for s in stop) or len(stop) > 4:
        raise bad("stop", "'stop' must be a string or a list of up to 4 strings (of up to 1000 characters).")
    return [s for s in stop if s]


def _int(body: dict, name: str, default: int, low: int, high: int, flag: str | None = None) -> int:
    value = body.get(name)
    if value is None:
        return default
    if not is_int(value) or not low <= value <= high:
        limit = f" (this server's limit: lmforge serve {flag})" if flag else ""
        raise bad(name, f"'{name}' must be an integer from {low} to {high}{limit}, not {value!r}.")
    return value


def _bool(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(name, f"'{name}' must be true or false, not {value!r}.")
    return value


def render_chat(messages, chat, limits: Limits | None = None) -> tuple[list[int], str]:
    """The prompt ids for chat ``messages`` with ``chat`` (the model's ``lmforge.inference.chat.ModelChat``,
    the rendering training used) and the template's name ("model" or "plain"); ApiError naming the bad
    field, or the limit (``limits``: --max-prompt-chars before rendering, --max-prompt-tokens after)."""
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
    chars = sum(len(m["content"]) for m in plain)
    if limits is not None and chars > limits.max_prompt_chars:
        raise ApiError(400, f"the messages have {chars} characters; this server accepts at most "
                       f"{limits.max_prompt_chars} (lmforge serve --max-prompt-chars).", param="messages",
                       code="context_length_exceeded")
    try:
        ids = chat.prompt_ids(plain)
    except LmforgeError as err:  # a template error is about the model directory, but the request can't be served
        raise ApiError(400, f"the model's chat template failed on these messages: {err}", param="messages") from None
    if limits is not None and len(ids) > limits.max_prompt_tokens:
        raise ApiError(400, f"the messages are {len(ids)} tokens; this server accepts at most "
                       f"{limits.max_prompt_tokens} (lmforge serve --max-prompt-tokens).", param="messages",
                       code="context_length_exceeded")
    return ids, chat.name
