"""Chat end to end: the template's ids and assistant mask against transformers' own, a tiny
data.format=chat pipeline (prepare -> vocab -> tokenize -> train -> evaluate), and its model chatting
the same through `lmforge generate --chat`, `lmforge serve`, a transformers export and llama.cpp."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from lmforge.tokenization.chat import CHATML_TEMPLATE, ChatEncoder, add_chatml_tokens, load_chat
from tests.helpers import ROOT, free_port, stop_process_group, wait_until_healthy

TEXT = ["Hello there, how are you? I am fine. The king and the queen speak of love.\n" * 20]
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
# ChatML with transformers' {% generation %} marks: its own assistant mask to compare ours with.
CHATML_MARKED = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>\\n' }}{% endgeneration %}{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CONVERSATIONS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there?"},
     {"role": "assistant", "content": "I am fine."}, {"role": "user", "content": "The king?"},
     {"role": "assistant", "content": "He speaks.\nThe queen too."}],
    [{"role": "user", "content": " héllo  東京 ,"}, {"role": "assistant", "content": "ok"}],
    [{"role": "user", "content": "one"}, {"role": "assistant", "content": ""}, {"role": "user", "content": "two"},
     {"role": "assistant", "content": "three"}],
]


def gpt2_style(directory: Path, template: str) -> Path:
    """A byte-level BPE tokenizer directory (GPT-2's scheme) with ChatML's tokens and ``template``."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(TEXT, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    add_chatml_tokens(tokenizer)
    directory.mkdir(parents=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "chat_template": template}))
    return directory


def llama_style(directory: Path) -> Path:
    """A SentencePiece-like BPE (▁ for spaces, byte fallback) with <s>, </s> and Llama 2's template."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    tokenizer.train_from_iterator(TEXT, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=[f"<0x{b:02X}>" for b in range(256)]))
    directory.mkdir(parents=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "chat_template": LLAMA2}))
    return directory


def hf_ids(hf, messages, **kwargs) -> list[int]:
    out = hf.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_template_ids_are_transformers_apply_chat_template(tmp_path, style):
    from transformers import AutoTokenizer

    directory = gpt2_style(tmp_path / "t", CHATML_TEMPLATE) if style == "gpt2" else llama_style(tmp_path / "t")
    hf = AutoTokenizer.from_pretrained(str(directory))
    encoder = ChatEncoder(Tokenizer.from_file(str(directory / "tokenizer.json")), load_chat(directory))
    for messages in CONVERSATIONS[:2]:
        assert encoder.encode(messages)[0] == hf_ids(hf, messages)
        assert encoder.prompt(messages[:-1]) == hf_ids(hf, messages[:-1], add_generation_prompt=True)
    ids, mask = encoder.encode(CONVERSATIONS[0])
    answer = "".join(hf.decode([i]) for i, m in zip(ids, mask) if m)
    end = "<|im_end|>\n" if style == "gpt2" else " </s>"
    assert answer.replace(" ", "") == ("I am fine." + end + "He speaks.\nThe queen too." + end).replace(" ", "")
    # The reply ends at the template's end of turn.
    assert [encoder.tokenizer.id_to_token(i) for i in encoder.stop_ids] == [end.strip()]


def test_the_mask_is_exactly_transformers_assistant_mask(tmp_path):
    from transformers import AutoTokenizer

    directory = gpt2_style(tmp_path / "t", CHATML_MARKED)
    hf = AutoTokenizer.from_pretrained(str(directory))
    encoder = ChatEncoder(Tokenizer.from_file(str(directory / "tokenizer.json")), load_chat(directory))
    for messages in CONVERSATIONS:
        theirs = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = encoder.encode(messages)
        assert ids == list(theirs["input_ids"])
        assert [int(m) for m in mask] == list(theirs["assistant_masks"])


# --- a tiny chat pipeline --------------------------------------------------------------------

FACTS = [("capital of France", "Paris"), ("color of the sky", "blue"), ("opposite of hot", "cold")]


def write_chat_data(path: Path) -> Path:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for i in range(48):
            q, a = FACTS[i % 3]
            messages = ([{"role": "system", "content": "Answer briefly."}] if i % 4 == 0 else []) + [
                {"role": "user", "content": f"What is the {q}?"}, {"role": "assistant", "content": f"It is {a}."}]
            if i % 5 == 0:
                messages += [{"role": "user", "content": "Thanks!"}, {"role": "assistant", "content": "Welcome."}]
            f.write(json.dumps({"messages": messages, "n": i}) + "\n")
        f.write("{not a record\n")
        f.write(json.dumps({"messages": [{"role": "user", "content": "no reply"}]}) + "\n")
        f.write(json.dumps({"messages": [{"role": "user", "content": "x" * 400}, {"role": "assistant",
                                                                               "content": "long"}]}) + "\n")
    return path


def chat_cfg(directory: Path, *overrides: str):
    from lmforge.config.compose import compose_config

    return compose_config(
        ["model=tiny", "model.block_size=64", "model.positions=rope", "model.norm=rmsnorm", "model.mlp=swiglu",
         "model.bias=false", "model.tie_embeddings=false", "model.n_kv_head=1", "tokenizer=bpe",
         "tokenizer.vocab_size=300", "train.max_steps=40",
         "train.eval_interval=20", "train.eval_iters=2", "train.log_every=10", "train.batch_size=8",
         "evaluate.max_new_tokens=12", "evaluate.temperature=0", f"tracking.uri=sqlite:///{directory}/mlflow.db",
         f"data.sources=[{directory}/chat.jsonl]", "data.format=chat", "data.prompts=null",
         "data.skip_bad_records=true", "data.dedupe=false", "evaluate.chat_prompts=[What is the color of the sky?]",
         *overrides],
        conf_dir=ROOT / "conf")


@pytest.fixture(scope="module")
def chat_project(tmp_path_factory):
    """A project after the five stages on chat data, byte-level BPE, a tiny Llama, 40 steps; its directory."""
    from lmforge.corpus.stage import prepare_stage
    from lmforge.evaluation.stage import evaluate_stage
    from lmforge.tokenization.encode import tokenize_stage
    from lmforge.tokenization.vocab import vocab_stage
    from lmforge.training.stage import train_stage

    directory = tmp_path_factory.mktemp("chat")
    write_chat_data(directory / "chat.jsonl")
    cfg = chat_cfg(directory)
    with contextlib.chdir(directory):
        for stage in (prepare_stage, vocab_stage, tokenize_stage, train_stage, evaluate_stage):
            stage(cfg)
    return directory


@pytest.mark.slow
def test_the_chat_pipeline_counts_masks_and_samples_replies(chat_project):
    prepare = json.loads((chat_project / "reports" / "prepare.json").read_text())
    assert prepare["format"] == "chat" and prepare["bad_records"] == 2 and prepare["records_out"] == 49
    tokenize = json.loads((chat_project / "reports" / "tokenize.json").read_text())
    assert tokenize["row_tokens"] == 65
    overlong = tokenize["train_overlong"] + tokenize["val_overlong"]
    assert overlong >= 1 and tokenize["train_truncated"] + tokenize["val_truncated"] == overlong
    vocab = json.loads((chat_project / "reports" / "vocab.json").read_text())
    assert vocab["added_tokens"] == ["<|im_start|>", "<|im_end|>"]
    metrics = json.loads((chat_project / "reports" / "metrics.json").read_text())
    assert metrics["val_tokens_scored"] == tokenize["val_loss_tokens"] and metrics["val_loss"] > 0
    samples = (chat_project / "reports" / "samples.md").read_text()
    assert "user: What is the color of the sky?\nassistant: " in samples
    model = chat_project / "models" / "gpt"
    assert (model / "chat_template.jinja").read_text() == CHATML_TEMPLATE


def our_reply(model_dir: Path, messages, n: int = 12) -> str:
    from lmforge.inference.chat import reply
    from lmforge.inference.sampling import SamplingConfig
    from lmforge.model.directory import load_model_dir

    return reply(load_model_dir(model_dir), messages, SamplingConfig(max_new_tokens=n, temperature=0.0))


ASK = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.slow
def test_generate_chat_and_serve_give_the_same_reply(chat_project):
    model = chat_project / "models" / "gpt"
    expected = our_reply(model, ASK)
    assert expected.strip(), "the model replies with nothing: the comparisons below would prove little"
    print(f"reply: {expected!r}")
    generate = subprocess.run(
        [sys.executable, "-m", "lmforge", "generate", "--model", str(model), "--chat", "--system", "Answer briefly.",
         "--prompt", "What is the capital of France?", "--temperature", "0", "--max-new-tokens", "12"],
        capture_output=True, text=True, check=True)
    assert generate.stdout == expected + "\n"
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", "--model", str(model), "--name", "chat",
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(proc, url)
        body = json.dumps({"model": "chat", "messages": ASK, "temperature": 0, "max_tokens": 12}).encode()
        request = urllib.request.Request(f"{url}/v1/chat/completions", body, {"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=60).read())
    finally:
        stop_process_group(proc)
    from lmforge.inference.chat import model_chat
    from lmforge.model.directory import load_model_dir

    assert answer["choices"][0]["message"]["content"] == expected
    assert answer["lmforge"]["chat_template"] == "model"
    assert answer["usage"]["prompt_tokens"] == len(model_chat(load_model_dir(model)).prompt_ids(ASK))


@pytest.mark.slow
def test_a_transformers_export_carries_the_template_and_replies_as_we_do(chat_project, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.inference.chat import model_chat
    from lmforge.interop.hf import export_hf
    from lmforge.model.directory import load_model_dir

    model = chat_project / "models" / "gpt"
    out = export_hf(model, tmp_path / "hf")
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == CHATML_TEMPLATE
    hf_tokenizer = AutoTokenizer.from_pretrained(str(out))
    ids = hf_ids(hf_tokenizer, ASK, add_generation_prompt=True)
    assert ids == model_chat(load_model_dir(model)).prompt_ids(ASK)
    hf_model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        tokens = hf_model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12)[0, len(ids):].tolist()
    ends = hf_model.generation_config.eos_token_id
    ends = set(ends if isinstance(ends, list) else [ends])
    reply = []
    for token in tokens:
        if token in ends:
            break
        reply.append(token)
    assert hf_tokenizer.decode(reply) == our_reply(model, ASK)


@pytest.mark.slow
def test_llama_cpp_reads_the_gguf_template_and_replies_as_we_do(chat_project, tmp_path):
    from lmforge.interop.gguf import export_gguf
    from tests.integration.test_gguf import llama_cpp

    model = chat_project / "models" / "gpt"
    path = export_gguf(model, tmp_path / "chat.gguf")
    llm = llama_cpp().Llama(str(path), n_ctx=64, n_threads=1, verbose=False)
    assert llm.metadata["tokenizer.chat_template"] == CHATML_TEMPLATE
    answer = llm.create_chat_completion(messages=ASK, temperature=0.0, top_k=1, repeat_penalty=1.0, max_tokens=12)
    assert answer["choices"][0]["message"]["content"] == our_reply(model, ASK)


def test_prompt_completion_counts_the_completion_and_its_end_only(tmp_path):
    import numpy as np

    from lmforge.corpus.stage import prepare_stage
    from lmforge.tokenization.encode import tokenize_stage
    from lmforge.tokenization.packing import LOSS, START
    from lmforge.tokenization.tokenizer import load_tokenizer
    from lmforge.tokenization.vocab import vocab_stage

    pairs = [{"prompt": f"Q{i}: 2+{i}=", "completion": f" {2 + i}."} for i in range(10)]
    (tmp_path / "pc.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    cfg = chat_cfg(tmp_path, "data.format=prompt_completion", "tokenizer=char", f"data.sources=[{tmp_path}/pc.jsonl]")
    with contextlib.chdir(tmp_path):
        for stage in (prepare_stage, vocab_stage, tokenize_stage):
            stage(cfg)
        assert not (tmp_path / "data" / "vocab" / "chat_template.jinja").exists()  # no template: plain text
        tokenizer = load_tokenizer(tmp_path / "data" / "vocab" / "tokenizer.json")
        rows = np.fromfile(tmp_path / "data" / "tokens" / "train" / "shard_000000.bin", dtype=np.uint16)
        flags = np.fromfile(tmp_path / "data" / "tokens" / "train-flags" / "shard_000000.bin", dtype=np.uint8)
    counted = tokenizer.decode(rows[(flags & LOSS) != 0].tolist(), skip_special_tokens=False)
    completions = "".join(p["completion"] + "<|endoftext|>" for p in pairs[:-1])  # the last is val's
    assert counted == completions
    assert int(((flags & START) != 0).sum()) >= 9  # each record starts a segment (and so does padding)
