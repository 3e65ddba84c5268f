"""The serving engine's greedy tokens are llama.cpp's on the f32 GGUF export of the same model: alone, and
batched with other requests at other lengths (the decode step's masked path), for GPT-2 and Llama."""

from __future__ import annotations

import queue

import pytest

from lmforge.inference.batching import Engine, Job
from lmforge.inference.sampling import SamplingConfig
from lmforge.interop.gguf import export_gguf
from lmforge.model.directory import load_model_dir
from tests.integration.test_gguf import FAMILIES, bpe_model_dir, llama_cpp_greedy

pytestmark = pytest.mark.usefixtures("one_thread")
NEW_TOKENS = 30


def engine_greedy(engine: Engine, prompts: list[list[int]]) -> list[list[int]]:
    """Each prompt's greedy continuation, all submitted at once so that they share the engine's steps."""
    events = [queue.Queue() for _ in prompts]
    cfg = SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=0.0)
    engine.submit(*(Job(ids, cfg, box.put, ignore_eos=True) for ids, box in zip(prompts, events)))
    out = []
    for box in events:
        tokens = []
        while (event := box.get(timeout=60)).kind != "done":
            assert event.kind == "token", event.text
            tokens.append(event.token_id)
        out.append(tokens)
    return out


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_served_greedy_tokens_are_llama_cpps(tmp_path, family):
    model_dir = bpe_model_dir(tmp_path / "model", **FAMILIES[family])
    path = export_gguf(model_dir, tmp_path / "model.gguf", "f32")
    loaded = load_model_dir(model_dir)
    prompts = [loaded.tokenizer.encode(text).ids for text in ("ROMEO: Good night", "the king", "Good night, fair")]
    engine = Engine(loaded, max_batch=4)
    try:
        alone = engine_greedy(engine, prompts[:1])
        together = engine_greedy(engine, prompts)
    finally:
        engine.close()
    expected = [llama_cpp_greedy(path, ids, NEW_TOKENS) for ids in prompts]
    assert alone == expected[:1]
    assert together == expected
