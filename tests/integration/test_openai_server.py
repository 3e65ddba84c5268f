"""`lmforge serve` against the official `openai` client: a real server on 127.0.0.1, a tiny random
model directory, completions and chat, streamed and not, n > 1, stop strings, seeds, errors,
batching across concurrent requests and clients that leave."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import httpx2 as httpx  # the HTTP client the openai package itself uses
import openai
import pytest
import torch

from lmforge.model.directory import save_model_dir
from lmforge.model.gpt import GPT, GPTConfig
from lmforge.serving.protocol import ApiError, render_chat
from lmforge.tokenization.tokenizer import save_tokenizer
from lmforge.tokenization.vocab import build_tokenizer
from tests.helpers import free_port, stop_process_group

NAME = "tiny"
BLOCK = 32
ALPHABET = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,:;!?'\n"


def make_model_dir(path):
    """A random 2-layer model with a character vocabulary that can spell chat turns (``user: ...``)."""
    tokenizer = build_tokenizer({"kind": "char", "special_tokens": ["<|endoftext|>", "<unk>"]}, [ALPHABET])
    save_tokenizer(tokenizer, path.parent / "tokenizer.json")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.get_vocab_size(), block_size=BLOCK, n_layer=2, n_head=4, n_embd=32,
                          positions="rope", norm="rmsnorm", mlp="swiglu"))
    meta = {"kind": "char", "eot_token": "<|endoftext|>", "eot_id": tokenizer.token_to_id("<|endoftext|>")}
    return save_model_dir(path, model, path.parent / "tokenizer.json", meta)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("serve") / "model")


@pytest.fixture(scope="module")
def server(model_dir):
    """The base URL of `lmforge serve` on a tiny model (4 slots, prompts up to 100 tokens)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmforge", "serve", "--model", str(model_dir), "--name", NAME, "--port", str(port),
         "--max-batch", "4", "--max-prompt-tokens", "100", "--max-tokens", "100000"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            if proc.poll() is not None:
                raise AssertionError(f"lmforge serve exited: {proc.stdout.read()}")
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield url
    finally:
        stop_process_group(proc)


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0) as c:
        yield c


def forward_passes(server) -> int:
    return httpx.get(f"{server}/health").json()["forward_passes"]


def complete(client, prompt="the king", **kwargs):
    kwargs.setdefault("max_tokens", 20)
    return client.completions.create(model=NAME, prompt=prompt, **kwargs)


def streamed_text(stream) -> tuple[dict[int, str], dict[int, str]]:
    """Text and finish reason of each choice of a completion or chat stream."""
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    for chunk in stream:
        for c in chunk.choices:
            piece = c.text if hasattr(c, "text") else (c.delta.content or "")
            texts[c.index] = texts.get(c.index, "") + piece
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    return texts, reasons


# --- Models, health, completions ---------------------------------------------------------------


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


def test_completion_counts_usage_and_seeds_reproduce(client):
    first = complete(client, seed=7, extra_body={"ignore_eos": True})
    again = complete(client, seed=7, extra_body={"ignore_eos": True})
    other = complete(client, seed=8, extra_body={"ignore_eos": True})
    assert first.object == "text_completion" and first.model == NAME
    assert first.choices[0].text == again.choices[0].text != other.choices[0].text
    assert first.choices[0].finish_reason == "length"
    assert (first.usage.prompt_tokens, first.usage.completion_tokens, first.usage.total_tokens) == (8, 20, 28)


def test_the_server_samples_what_generate_samples(client, model_dir):
    from lmforge.inference.generation import SamplingConfig, complete_samples
    from lmforge.model.directory import load_model_dir

    cfg = SamplingConfig(max_new_tokens=40, temperature=0.9, top_k=20, seed=13)
    expected = complete_samples(load_model_dir(model_dir), "the king", cfg, ["xq"], num_samples=2)
    answer = complete(client, max_tokens=40, temperature=0.9, seed=13, stop="xq", n=2, extra_body={"top_k": 20})
    assert [c.text for c in answer.choices] == expected


def test_n_samples_differ_and_repeat_with_the_seed(client):
    first = complete(client, n=3, seed=3, extra_body={"ignore_eos": True})
    again = complete(client, n=3, seed=3, extra_body={"ignore_eos": True})
    texts = [c.text for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.text for c in again.choices] and len(set(texts)) == 3
    assert first.usage.completion_tokens == 60


def test_stream_gives_the_same_text_and_ends_with_done(client, server):
    whole = complete(client, n=2, seed=11, max_tokens=30)
    texts, reasons = streamed_text(complete(client, n=2, seed=11, max_tokens=30, stream=True))
    assert [texts[0], texts[1]] == [c.text for c in whole.choices]
    assert [reasons[0], reasons[1]] == [c.finish_reason for c in whole.choices]
    body = {"model": NAME, "prompt": "the king", "max_tokens": 5, "stream": True, "seed": 1,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server}/v1/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["usage"]["prompt_tokens"] == 8


def test_stop_string_ends_the_text_before_it(client):
    text = complete(client, seed=5, max_tokens=40, extra_body={"ignore_eos": True}).choices[0].text
    stop = text[12:14]
    stopped = complete(client, seed=5, max_tokens=40, stop=[stop, "never there"], extra_body={"ignore_eos": True})
    assert stopped.choices[0].text == text[: text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    streamed, reasons = streamed_text(
        complete(client, seed=5, max_tokens=40, stop=stop, stream=True, extra_body={"ignore_eos": True}))
    assert (streamed[0], reasons[0]) == (text[: text.index(stop)], "stop")


def test_logprobs_of_the_chosen_tokens(client):
    answer = complete(client, seed=2, max_tokens=10, logprobs=1, extra_body={"ignore_eos": True})
    logprobs = answer.choices[0].logprobs
    assert "".join(logprobs.tokens) == answer.choices[0].text
    assert len(logprobs.token_logprobs) == 10 and all(lp <= 0 for lp in logprobs.token_logprobs)
    greedy = complete(client, max_tokens=10, temperature=0, logprobs=0, extra_body={"ignore_eos": True})
    assert greedy.choices[0].text == complete(client, max_tokens=10, temperature=0,
                                              extra_body={"ignore_eos": True}).choices[0].text


def test_extra_sampling_fields_are_used(client):
    plain = complete(client, seed=4, max_tokens=30, extra_body={"ignore_eos": True}).choices[0].text
    top1 = complete(client, seed=4, max_tokens=30, extra_body={"ignore_eos": True, "top_k": 1}).choices[0].text
    greedy = complete(client, temperature=0, max_tokens=30, extra_body={"ignore_eos": True}).choices[0].text
    assert top1 == greedy != plain
    penalised = complete(client, temperature=0, max_tokens=30,
                         extra_body={"ignore_eos": True, "repetition_penalty": 5.0}).choices[0].text
    assert penalised != greedy


def test_a_prompt_past_the_block_size_is_cropped_and_says_so(client):
    short = complete(client, prompt="the king", max_tokens=3)
    assert short.model_extra["lmforge"] == {"prompt_tokens_used": 8, "prompt_cropped": False}
    long = complete(client, prompt="a" * 60, max_tokens=3)
    assert long.model_extra["lmforge"] == {"prompt_tokens_used": BLOCK, "prompt_cropped": True}
    assert long.usage.prompt_tokens == 60


# --- The rest of the surface: prompt lists, token ids, echo, top logprobs, penalties, best_of -------


def ids_of(server: str, text: str) -> list[int]:
    """The token ids of ``text``, from the server's own tokenizer (vLLM's /tokenize)."""
    return httpx.post(f"{server}/tokenize", json={"prompt": text}).json()["tokens"]


def test_a_list_of_prompts_is_one_request_numbered_prompt_major(client):
    prompts = ["the king", "fair lord", "good night"]
    batch = complete(client, prompt=prompts, n=2, seed=5, max_tokens=12, extra_body={"ignore_eos": True})
    assert [c.index for c in batch.choices] == list(range(6))
    alone = [complete(client, prompt=p, n=2, seed=5, max_tokens=12, extra_body={"ignore_eos": True}) for p in prompts]
    assert [c.text for c in batch.choices] == [c.text for a in alone for c in a.choices]
    assert batch.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert batch.usage.completion_tokens == 6 * 12
    texts, reasons = streamed_text(complete(client, prompt=prompts, n=2, seed=5, max_tokens=12, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert [texts[i] for i in range(6)] == [c.text for c in batch.choices] and set(reasons.values()) == {"length"}


def test_token_id_prompts_are_the_text_prompts(client, server, model_dir):
    from lmforge.model.directory import load_model_dir

    tokenizer = load_model_dir(model_dir).tokenizer
    assert ids_of(server, "the king") == tokenizer.encode("the king", add_special_tokens=False).ids
    detokenized = httpx.post(f"{server}/detokenize", json={"tokens": ids_of(server, "the king")}).json()
    assert detokenized["prompt"] == "the king"
    by_text = complete(client, prompt="the king", seed=3, max_tokens=10)
    by_ids = complete(client, prompt=ids_of(server, "the king"), seed=3, max_tokens=10)
    both = complete(client, prompt=[ids_of(server, "the king"), ids_of(server, "fair")], seed=3, max_tokens=10)
    assert by_ids.choices[0].text == by_text.choices[0].text == both.choices[0].text
    assert both.choices[1].text == complete(client, prompt="fair", seed=3, max_tokens=10).choices[0].text


def test_echo_gives_the_prompt_and_its_own_logprobs(client):
    answer = complete(client, prompt="the king", echo=True, logprobs=3, max_tokens=5, seed=1,
                      extra_body={"ignore_eos": True})
    choice, plain = answer.choices[0], complete(client, prompt="the king", max_tokens=5, seed=1,
                                                extra_body={"ignore_eos": True}).choices[0]
    assert choice.text == "the king" + plain.text
    lp = choice.logprobs
    assert len(lp.tokens) == 8 + 5 and "".join(lp.tokens) == choice.text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x <= 0 for x in lp.token_logprobs[1:]) and lp.text_offset[:3] == [0, 1, 2]
    for chosen, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert 1 <= len(top) <= 3 and max(top.values()) >= chosen - 1e-6
    only = complete(client, prompt="the king", echo=True, logprobs=1, max_tokens=0)
    assert only.choices[0].text == "the king" and only.usage.completion_tokens == 0
    assert only.choices[0].logprobs.token_logprobs == lp.token_logprobs[:8]


def test_top_logprobs_of_chat_and_completions(client):
    answer = complete(client, max_tokens=6, temperature=0, logprobs=4, extra_body={"ignore_eos": True})
    for token, chosen, top in zip(answer.choices[0].logprobs.tokens, answer.choices[0].logprobs.token_logprobs,
                                  answer.choices[0].logprobs.top_logprobs):
        assert top[token] == chosen == max(top.values())  # greedy: the chosen token is the most likely
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          logprobs=True, top_logprobs=2, seed=1)
    content = chat.choices[0].logprobs.content
    assert len(content) >= 1 and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob for c in content)


def test_penalties_logit_bias_user_and_models_by_id(client, server):
    greedy = complete(client, temperature=0, max_tokens=30, extra_body={"ignore_eos": True}).choices[0].text
    for change in (dict(frequency_penalty=2.0), dict(presence_penalty=2.0)):
        assert complete(client, temperature=0, max_tokens=30, extra_body={"ignore_eos": True},
                        **change).choices[0].text != greedy
    z = str(ids_of(server, "z")[0])
    biased = complete(client, temperature=0, max_tokens=10, logit_bias={z: 100}, extra_body={"ignore_eos": True})
    assert biased.choices[0].text == "z" * 10
    assert complete(client, max_tokens=3, user="someone").choices[0].finish_reason in ("stop", "length")
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_best_of_answers_the_most_likely_samples(client):
    import statistics

    def mean_logprob(c):
        return statistics.fmean(c.logprobs.token_logprobs)

    every = complete(client, n=4, seed=9, max_tokens=10, logprobs=0, extra_body={"ignore_eos": True})
    best = complete(client, n=2, best_of=4, seed=9, max_tokens=10, logprobs=0, extra_body={"ignore_eos": True})
    ranked = sorted(every.choices, key=mean_logprob, reverse=True)
    assert [c.text for c in best.choices] == [c.text for c in ranked[:2]] and [c.index for c in best.choices] == [0, 1]
    assert best.usage.completion_tokens == 40  # all four were sampled
    with pytest.raises(openai.BadRequestError, match="best_of"):
        complete(client, n=1, best_of=2, stream=True)


# --- Chat --------------------------------------------------------------------------------------


def test_chat_with_the_plain_template_streamed_and_not(client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Who is the king?"}]
    whole = client.chat.completions.create(model=NAME, messages=messages, max_tokens=25, seed=9, n=2)
    assert whole.object == "chat.completion"
    assert whole.model_extra["lmforge"]["chat_template"] == "plain"
    assert whole.choices[0].message.role == "assistant"
    # "system: be brief\nuser: Who is the king?\nassistant:"
    assert whole.usage.prompt_tokens == len("system: be brief\nuser: Who is the king?\nassistant:")
    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=25, seed=9, n=2, stream=True)
    texts, _ = streamed_text(stream)
    assert [texts[0], texts[1]] == [c.message.content for c in whole.choices]


def test_chat_template_of_the_model_directory_is_rendered(tmp_path):
    from lmforge.inference.chat import model_chat
    from lmforge.model.directory import load_model_dir

    loaded = load_model_dir(make_model_dir(tmp_path / "m"))
    ids, used = render_chat([{"role": "user", "content": "hi"}], model_chat(loaded))
    assert (loaded.tokenizer.decode(ids), used) == ("user: hi\nassistant:", "plain")
    (tmp_path / "m" / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m.role }}.{{ m.content }}{% endfor %}{% if add_generation_prompt %}A:{% endif %}")
    ids, used = render_chat([{"role": "user", "content": "hi"}], model_chat(loaded))
    assert (loaded.tokenizer.decode(ids), used) == ("user.hiA:", "model")
    with pytest.raises(ApiError, match="messages"):
        render_chat([{"role": "user", "content": 3}], model_chat(loaded))


# --- Errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, param", [
    (dict(top_p=3), "top_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(temperature=-1), "temperature"),
    (dict(n=0), "n"),
    (dict(n=5), "n"),  # more samples than the server's 4 slots
    (dict(extra_body={"top_k": 0}), "top_k"),
    (dict(extra_body={"repetition_penalty": "high"}), "repetition_penalty"),
    (dict(extra_body={"top-k": 5}), "top-k"),  # a typo is named, not ignored
    (dict(presence_penalty=3.0), "presence_penalty"),  # OpenAI's range is -2 to 2
    (dict(stop=5), "stop"),
    (dict(prompt="the king ~"), "prompt"),  # a character the model does not know
    (dict(prompt="a" * 101), "prompt"),  # past --max-prompt-tokens
])
def test_bad_values_are_a_400_naming_the_field(client, kwargs, param):
    kwargs = {"prompt": "the king", **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=NAME, max_tokens=kwargs.pop("max_tokens", 5), **kwargs)
    assert err.value.status_code == 400
    assert err.value.body["param"] == param and err.value.body["type"] == "invalid_request_error"
    assert param.split("[")[0] in err.value.body["message"] or param == "prompt"


def test_unknown_model_is_a_404_and_malformed_bodies_a_400(client, server):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-4", prompt="the king")
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=NAME, messages=[])
    assert err.value.body["param"] == "messages"
    response = httpx.post(f"{server}/v1/completions", content=b"{not json",
                          headers={"content-type": "application/json"})
    assert response.status_code == 400 and "error" in response.json()
    assert httpx.get(f"{server}/v1/nothing").json()["error"]["type"] == "not_found_error"


def test_the_command_refuses_a_missing_model_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lmforge", "serve", "--model", str(tmp_path / "none")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1


# --- Batching and clients that leave --------------------------------------------------------------


def test_concurrent_requests_share_forward_passes_and_give_the_sequential_tokens(client, server):
    # 400 tokens each, sent at once: long enough to overlap on a machine busy with other work (at 40
    # tokens, one request could finish before a slowed thread had sent the other).
    asks = [dict(prompt="the king", seed=21, max_tokens=400), dict(prompt="fair lord", seed=22, max_tokens=400, n=2)]
    sequential = [[c.text for c in complete(client, extra_body={"ignore_eos": True}, **a).choices] for a in asks]
    before = forward_passes(server)
    results: list = [None, None]
    together = threading.Barrier(2)

    def run(i):
        together.wait()
        results[i] = [c.text for c in complete(client, extra_body={"ignore_eos": True}, **asks[i]).choices]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == sequential
    assert forward_passes(server) - before < 800  # alone, the two would take 400 passes each


def test_a_short_request_is_not_held_up_by_a_long_one(client, server):
    long = complete(client, seed=1, max_tokens=5000, stream=True, extra_body={"ignore_eos": True})
    try:
        next(iter(long))  # the long request is decoding
        short = complete(client, seed=2, max_tokens=3, extra_body={"ignore_eos": True})
        assert short.choices[0].finish_reason == "length"
        assert httpx.get(f"{server}/health").json()["active_samples"] == 1  # only the long one, still running
    finally:
        long.close()


def test_a_client_that_leaves_frees_its_slots(server):
    body = {"model": NAME, "prompt": "the king", "max_tokens": 100_000, "ignore_eos": True, "n": 4}
    for stream in (True, False):
        with httpx.Client(timeout=2) as http:
            if stream:
                with http.stream("POST", f"{server}/v1/completions", json={**body, "stream": True}) as response:
                    next(response.iter_lines())
            else:
                with pytest.raises(httpx.ReadTimeout):
                    http.post(f"{server}/v1/completions", json=body)
        for _ in range(100):  # the server notices within a second or so
            if httpx.get(f"{server}/health").json()["active_samples"] == 0:
                break
            time.sleep(0.2)
        assert httpx.get(f"{server}/health").json()["active_samples"] == 0


# --- The docs' examples ------------------------------------------------------------------------


def readme_serving_blocks() -> dict[str, list[str]]:
    """The code blocks of docs/serving.md's section on `lmforge serve`, by language."""
    from tests.helpers import ROOT

    text = (ROOT / "docs/serving.md").read_text(encoding="utf-8")
    section = text[text.index("\n## The OpenAI API: `lmforge serve`\n"):text.index("\n## MLflow model serving\n")]
    blocks: dict[str, list[str]] = {}
    for part in section.split("```")[1::2]:
        language, _, body = part.partition("\n")
        blocks.setdefault(language, []).append(body)
    return blocks


def test_the_readme_examples_run_against_the_server(server):
    host = server.removeprefix("http://")
    blocks = readme_serving_blocks()
    assert blocks["bash"][0].startswith("lmforge serve --model ")  # what the server fixture runs
    curl = blocks["bash"][1].replace("127.0.0.1:8000", host).replace('"gpt"', f'"{NAME}"')
    commands = ["curl" + c for c in curl.split("curl")[1:]]
    answer = subprocess.run(["bash", "-c", commands[0]], capture_output=True, text=True, timeout=120)
    assert json.loads(answer.stdout)["choices"][0]["finish_reason"] in ("stop", "length")
    stream = subprocess.run(["bash", "-c", commands[1]], capture_output=True, text=True, timeout=120)
    assert stream.stdout.rstrip().endswith("data: [DONE]")
    code = blocks["python"][0].replace("http://127.0.0.1:8000", server).replace('"gpt"', f'"{NAME}"')
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


# --- A registered MLflow model with its own chat template ----------------------------------------


@pytest.mark.slow
def test_a_registered_model_is_served_with_its_chat_template(tmp_path):
    from mlflow.tracking import MlflowClient

    from lmforge.model.directory import write_run_info
    from lmforge.serving.pyfunc import log_pyfunc_model
    from lmforge.tracking import runs as tracking

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    experiment_id = tracking.ensure_experiment(uri, "serve-test")
    run = {"tracking_uri": uri, "experiment_id": experiment_id,
           "run_id": MlflowClient(tracking_uri=uri).create_run(experiment_id).info.run_id}
    model_dir = make_model_dir(tmp_path / "model")
    (model_dir / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m.role | upper }}: {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}", encoding="utf-8")
    write_run_info(model_dir, run)
    log_pyfunc_model(model_dir, run, "tiny-chat")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmforge", "serve", "--model", "models:/tiny-chat/1", "--tracking-uri", uri,
         "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**os.environ, "LMFORGE_CACHE": str(tmp_path / "cache")})
    try:
        for _ in range(600):
            if proc.poll() is not None:
                raise AssertionError(f"lmforge serve exited: {proc.stdout.read()}")
            try:
                httpx.get(f"http://127.0.0.1:{port}/health")
                break
            except httpx.TransportError:
                time.sleep(0.2)
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0) as c:
            assert [m.id for m in c.models.list().data] == ["models:/tiny-chat/1"]
            answer = c.chat.completions.create(model="models:/tiny-chat/1", max_tokens=5, seed=1,
                                               messages=[{"role": "user", "content": "Hail"}])
    finally:
        stop_process_group(proc)
    assert answer.model_extra["lmforge"]["chat_template"] == "model"
    assert answer.usage.prompt_tokens == len("USER: Hail\nASSISTANT:")


@pytest.mark.slow
def test_a_short_load_run_of_good_bad_and_leaving_clients_passes_its_checks(tmp_path):
    from tests.helpers import ROOT

    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve_load.py"), "--seconds", "5",
                           "--workers", "4", "--out", str(tmp_path / "load.json")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout and proc.stdout.count("ok   ") == 5
    assert all(json.loads((tmp_path / "load.json").read_text())["checks"].values())
