"""Generation speed on CPU: our engine with and without its KV cache, HuggingFace
``transformers``' ``generate()`` on the exported copy of the same model, and llama.cpp
(llama-cpp-python) on its q8_0 GGUF export, in one run.

    python benchmarks/generate.py [--model DIR | --arch gpt2 llama] [--new-tokens 500] [--block-size 256]
                                  [--tokenizer bpe|char] [--threads 1] [--repeats 5]

Without ``--model`` the models are the ``baby`` config (conf/model/baby.yaml) with
``block_size=256``, randomly initialised, over a vocabulary of Shakespeare's plays (``--tokenizer``:
byte-level BPE of 512 tokens, the default, or characters): GPT-2 style as configured but with
GPT-2's tanh GELU (what a gpt2 GGUF file computes), and the same sizes with RoPE, RMSNorm and
SwiGLU (``--arch``). A model GGUF cannot hold (a character vocabulary, exact GELU) gets no
llama.cpp column, and the table says why.
Each measurement samples ``--new-tokens`` tokens (temperature 1, top-k 50) after an 8-token prompt; the generators take
turns for ``--repeats`` rounds, and the table gives the best and the median tokens per second
(prefill included) of each.

500 new tokens pass a 256-token block, and ``transformers`` does not crop: a GPT-2 with 256
positions cannot go past 256 tokens. So ``generate()`` is run by our window rule (see
``lmforge.inference.generation``): up to ``block_size`` tokens, then again from the last ``block_size // 2``
tokens, each call with a fresh cache, which is exactly the work our engine does; llama.cpp is
run by the same rule. Greedy tokens are compared as a check that the engines compute the same
model (llama.cpp's q8_0 weights are rounded, so its greedy tokens part from ours sooner).

Prints a table and writes ``benchmarks/results/generate.json``.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PROMPT_TOKENS = 8
TOP_K = 50


def build_model_dir(arch: str, block_size: int, out: Path, tokenizer_kind: str = "bpe") -> Path:
    """A randomly initialised model directory: the baby config, a vocabulary of the plays."""
    from lmforge.config.compose import compose_config
    from lmforge.corpus.sources import resolve_sources
    from lmforge.model.directory import save_model_dir
    from lmforge.model.gpt import GPT, GPTConfig
    from lmforge.tokenization.tokenizer import eot_token_id, save_tokenizer
    from lmforge.tokenization.vocab import build_tokenizer
    from lmforge.training.stage import model_config_for

    overrides = ["model=baby", f"model.block_size={block_size}", f"tokenizer={tokenizer_kind}"]
    if tokenizer_kind == "bpe":
        overrides += ["tokenizer.vocab_size=512", "model.mlp=gelu_tanh"]
    if arch == "llama":
        overrides += ["model.positions=rope", "model.norm=rmsnorm", "model.mlp=swiglu", "model.bias=false",
                      "model.tie_embeddings=false"]
    cfg = compose_config(overrides, conf_dir=ROOT / "conf")
    texts = [p.read_text(encoding="utf-8") for p in resolve_sources(cfg.data.sources)]
    tokenizer = build_tokenizer(cfg.tokenizer, texts)
    save_tokenizer(tokenizer, out / "tokenizer.json")
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_dict(model_config_for(cfg, tokenizer.get_vocab_size())))
    meta = {"kind": tokenizer_kind, "eot_token": cfg.tokenizer.eot_token,
            "eot_id": eot_token_id(tokenizer, cfg.tokenizer.eot_token)}
    return save_model_dir(out / f"baby-{arch}-{tokenizer_kind}", model, out / "tokenizer.json", meta)


def time_rates(runs: dict, new_tokens: int, repeats: int) -> dict[str, list[float]]:
    """Tokens/s of each of ``runs`` (name: callable) in each of ``repeats`` rounds.

    Each round times every generator once, in turn, after one untimed warm-up of each: on a
    machine shared with other work, a slow patch then hits all of them alike.
    """
    for run in runs.values():
        run()
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            rates[name].append(new_tokens / (time.perf_counter() - start))
    return rates


def windowed_hf_generate(hf, prompt: torch.Tensor, new_tokens: int, block_size: int, gen_cfg) -> torch.Tensor:
    """``generate()`` by our window rule: fill the block, restart from its last half, repeat."""
    tokens = prompt
    start = max(0, tokens.size(1) - block_size)
    restart = block_size // 2
    while tokens.size(1) - prompt.size(1) < new_tokens:
        window = tokens[:, start:]
        room = min(block_size - window.size(1) + 1, new_tokens - (tokens.size(1) - prompt.size(1)))
        call_cfg = copy.deepcopy(gen_cfg)
        call_cfg.max_new_tokens = room
        out = hf.generate(window, generation_config=call_cfg, attention_mask=torch.ones_like(window))
        tokens = torch.cat([tokens, out[:, window.size(1):]], dim=1)
        start = tokens.size(1) - restart
    return tokens


def windowed_llama_cpp_generate(llm, prompt: list[int], new_tokens: int, block_size: int, **sampling) -> list[int]:
    """llama.cpp's ``generate`` by our window rule (see ``windowed_hf_generate``), fresh context each window."""
    import itertools

    tokens = list(prompt)
    window = tokens[-block_size:]
    while len(tokens) - len(prompt) < new_tokens:
        room = min(block_size - len(window) + 1, new_tokens - (len(tokens) - len(prompt)))
        tokens += itertools.islice(llm.generate(window, reset=True, **sampling), room)
        window = tokens[-(block_size // 2):]
    return tokens


def llama_cpp_runs(model_dir: Path, prompt: list[int], block_size: int, args,
                   tmp: Path) -> tuple[dict, list[int] | str]:
    """The llama.cpp generator on the q8_0 export, and its greedy tokens; or ({}, why not)."""
    from lmforge.errors import LmforgeError
    from lmforge.interop.gguf import export_gguf

    try:
        path = export_gguf(model_dir, tmp / f"{model_dir.name}-q8_0.gguf", "q8_0")
        import llama_cpp
    except (LmforgeError, ImportError) as err:
        return {}, str(err)
    llm = llama_cpp.Llama(str(path), n_ctx=block_size, n_threads=args.threads, seed=0, verbose=False)
    sampled = dict(temp=1.0, top_k=TOP_K, top_p=1.0, min_p=0.0, repeat_penalty=1.0)
    greedy = windowed_llama_cpp_generate(llm, prompt, args.new_tokens, block_size,
                                         temp=0.0, top_k=1, repeat_penalty=1.0)
    run = lambda: windowed_llama_cpp_generate(llm, prompt, args.new_tokens, block_size, **sampled)  # noqa: E731
    return {"llama.cpp, q8_0 GGUF": run}, greedy


def measure(model_dir: Path, label: str, args, tmp: Path) -> dict:
    """The generators on one model directory (and its exports), plus the greedy checks."""
    import transformers

    from lmforge.inference.generation import SamplingConfig, generate
    from lmforge.interop.hf import export_hf
    from lmforge.model.directory import load_model_dir

    loaded = load_model_dir(model_dir)
    model, block_size = loaded.model, loaded.model.config.block_size
    hf_dir = export_hf(model_dir, tmp / f"{model_dir.name}-hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    # Our token-level engine never stops early; nor should generate() (no eos, no eos suppression).
    hf.generation_config.eos_token_id = hf.config.eos_token_id = None

    prompt = torch.randint(0, model.config.vocab_size, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    n = args.new_tokens
    sampled = dict(temperature=1.0, top_k=TOP_K, seed=0)
    hf_sampled = transformers.GenerationConfig(do_sample=True, top_k=TOP_K, temperature=1.0, top_p=1.0,
                                               eos_token_id=None, pad_token_id=loaded.eot_id, use_cache=True)
    hf_no_cache = transformers.GenerationConfig(**{**hf_sampled.to_dict(), "use_cache": False})
    hf_greedy = transformers.GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=loaded.eot_id)

    # The check: greedy decoding of the two implementations gives the same tokens.
    with torch.inference_mode():
        ours_greedy = generate(model, prompt, SamplingConfig(max_new_tokens=n, temperature=0.0))
        theirs_greedy = windowed_hf_generate(hf, prompt, n, block_size, hf_greedy)
    agree = int((ours_greedy == theirs_greedy).all(0).long().cumprod(0).sum()) - PROMPT_TOKENS
    llama_cpp_run, llama_cpp_greedy = llama_cpp_runs(model_dir, prompt[0].tolist(), block_size, args, tmp)
    if llama_cpp_run:
        pairs = zip(llama_cpp_greedy[PROMPT_TOKENS:], ours_greedy[0, PROMPT_TOKENS:].tolist())
        llama_cpp_agree = next((i for i, (a, b) in enumerate(pairs) if a != b), n)

    def ours(use_cache: bool):
        return lambda: generate(model, prompt, SamplingConfig(max_new_tokens=n, use_cache=use_cache, **sampled))

    def theirs(gen_cfg):
        def run():
            torch.manual_seed(0)
            with torch.inference_mode():
                windowed_hf_generate(hf, prompt, n, block_size, gen_cfg)
        return run

    rates = time_rates({
        "lmforge, KV cache": ours(True),
        "lmforge, no cache": ours(False),
        "transformers generate(), KV cache": theirs(hf_sampled),
        "transformers generate(), no cache": theirs(hf_no_cache),
        **llama_cpp_run,
    }, n, args.repeats)
    # Other work on the machine only ever slows a run down, so the best run is the truest figure.
    best = {name: max(r) for name, r in rates.items()}
    median = {name: statistics.median(r) for name, r in rates.items()}
    ours_best, ours_median = best["lmforge, KV cache"], median["lmforge, KV cache"]
    result = {
        "model": label,
        "architecture": type(hf).__name__,
        "parameters": model.num_params(non_embedding=False),
        "block_size": block_size,
        "tokens_per_second_best": best,
        "tokens_per_second_median": median,
        "tokens_per_second_runs": rates,
        "cache_speedup": ours_best / best["lmforge, no cache"],
        "ours_vs_transformers_cached": ours_best / best["transformers generate(), KV cache"],
        "cache_speedup_median": ours_median / median["lmforge, no cache"],
        "ours_vs_transformers_cached_median": ours_median / median["transformers generate(), KV cache"],
        "greedy_tokens_equal": agree,
    }
    if llama_cpp_run:
        result["llama_cpp_q8_0_greedy_tokens_equal"] = llama_cpp_agree
        result["llama_cpp_q8_0_vs_ours_cached"] = best["llama.cpp, q8_0 GGUF"] / ours_best
    else:
        result["llama_cpp_not_measured"] = llama_cpp_greedy
    print(f"\n{label}: {type(hf).__name__}, {result['parameters'] / 1e6:.2f}M parameters")
    print(f"| {'generator':36} | best tokens/s | median tokens/s | best vs lmforge cached |")
    print(f"|{'-' * 38}|--------------:|----------------:|-----------------------:|")
    for name in rates:
        print(f"| {name:36} | {best[name]:13.0f} | {median[name]:15.0f} | {best[name] / ours_best:22.2f} |")
    print(f"cache speedup: {result['cache_speedup']:.1f}x best, {result['cache_speedup_median']:.1f}x median "
          f"(want >= 5); lmforge vs transformers, both cached: {result['ours_vs_transformers_cached']:.2f}x best, "
          f"{result['ours_vs_transformers_cached_median']:.2f}x median (want >= 1.0)")
    print(f"greedy check: the first {agree} of {n} new tokens are equal in both implementations")
    if llama_cpp_run:
        print(f"llama.cpp q8_0 greedy: the first {llama_cpp_agree} of {n} new tokens equal ours")
    else:
        print(f"llama.cpp: not measured ({llama_cpp_greedy})")
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a model directory (default: random baby models)")
    parser.add_argument("--arch", nargs="+", choices=("gpt2", "llama"), default=["gpt2", "llama"],
                        help="the random models' families")
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--tokenizer", choices=("bpe", "char"), default="bpe", help="the random models' vocabulary")
    parser.add_argument("--new-tokens", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest at this size)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/generate.json"))
    args = parser.parse_args(argv)

    import transformers

    from lmforge.outputs import write_json

    torch.set_num_threads(args.threads)
    print(f"{args.new_tokens} new tokens after {PROMPT_TOKENS} prompt tokens, temperature 1, top-k {TOP_K}, "
          f"{args.threads} thread(s), {args.repeats} rounds")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.model:
            models = [(Path(args.model), str(args.model))]
        else:
            models = [(build_model_dir(arch, args.block_size, tmp, args.tokenizer),
                       f"random baby ({arch}, {args.tokenizer} vocabulary), block_size={args.block_size}")
                      for arch in args.arch]
        results = [measure(model_dir, label, args, tmp) for model_dir, label in models]
    report = {
        "new_tokens": args.new_tokens,
        "prompt_tokens": PROMPT_TOKENS,
        "sampling": f"temperature 1, top-k {TOP_K}",
        "threads": args.threads,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "models": results,
    }
    write_json(args.out, report)
    print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    main()
