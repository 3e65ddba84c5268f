"""The ``lmforge`` command: pipeline stages (with ``key=value`` overrides) and model tools.

    lmforge prepare|vocab|tokenize|train|evaluate [key=value | group=choice ...]
    lmforge compose [overrides...]          rewrite params.yaml from conf/
    lmforge generate --model DIR --prompt TEXT [sampling options]

A mistake the user can fix ends in one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from lmforge.errors import LmforgeError


def _stage(name: str) -> Callable:
    # Imported lazily: `lmforge generate` should not pay for importing the training stack.
    if name == "prepare":
        from lmforge.corpus import prepare as run
    elif name == "vocab":
        from lmforge.vocab import vocab_stage as run
    elif name == "tokenize":
        from lmforge.tokens import tokenize as run
    elif name == "train":
        from lmforge.training import train as run
    elif name == "evaluate":
        from lmforge.evaluation import evaluate as run
    else:
        raise LmforgeError(f"unknown stage '{name}'; stages: {', '.join(STAGES)}.")
    return run


STAGES = ("prepare", "vocab", "tokenize", "train", "evaluate")


def run_stage(name: str, overrides: Sequence[str] | None = None) -> None:
    """Entry point of ``pipelines/<name>.py``: read params.yaml + overrides, run the stage."""
    overrides = sys.argv[1:] if overrides is None else overrides
    _guarded(lambda: _run_stage(name, overrides))


def _run_stage(name: str, overrides: Sequence[str]) -> None:
    from lmforge.config import load_config
    from lmforge.tracking import quiet_mlflow_env

    quiet_mlflow_env()
    cfg = load_config(overrides)
    result = _stage(name)(cfg)
    if name == "evaluate" and isinstance(result, dict):
        print("  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))


def _guarded(action: Callable[[], object]) -> None:
    try:
        action()
    except LmforgeError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def _generate(args: argparse.Namespace) -> None:
    from lmforge.generation import SamplingConfig, stream_completion
    from lmforge.modeldir import load_model_dir

    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                              seed=args.seed, use_cache=not args.no_cache)
    try:
        sampling.validate()
    except ValueError as err:
        raise LmforgeError(str(err)) from None
    loaded = load_model_dir(args.model)
    prompts = [args.prompt] if args.prompt is not None else []
    if args.interactive:
        _interactive(loaded, sampling, args)
        return
    if not prompts:
        raise LmforgeError("give --prompt TEXT (or --interactive).")
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        sys.stdout.write(args.prompt)
        for piece in stream_completion(loaded, args.prompt, sampling, stop=args.stop):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        if sampling.seed is not None:
            sampling.seed += 1


def _interactive(loaded, sampling, args) -> None:
    from lmforge.generation import stream_completion

    print("lmforge chat: type a prompt, an empty line or Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            prompt = input("> ")
        except EOFError:
            break
        if not prompt:
            break
        prompt = prompt.encode("utf-8").decode("unicode_escape") if args.escapes else prompt
        sys.stdout.write(prompt)
        for piece in stream_completion(loaded, prompt, sampling, stop=args.stop):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")


def _compose(args: argparse.Namespace) -> None:
    from lmforge.config import compose_config, write_params

    write_params(compose_config(args.overrides))
    print("wrote params.yaml")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmforge", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for stage in STAGES:
        p = sub.add_parser(stage, help=f"run the {stage} stage (reads params.yaml)")
        p.add_argument("overrides", nargs="*", help="key=value or group=choice")
    p = sub.add_parser("compose", help="rewrite params.yaml from conf/ (what `dvc exp run` does)")
    p.add_argument("overrides", nargs="*")

    g = sub.add_parser("generate", help="sample text from a model directory, streamed as it is produced")
    g.add_argument("--model", required=True, help="model directory (e.g. models/gpt)")
    g.add_argument("--prompt", help="text to continue")
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--num-samples", type=int, default=1)
    g.add_argument("--stop", action="append", default=None, help="stop when this string is produced (repeatable)")
    g.add_argument("--no-cache", action="store_true", help="recompute the context every step (slow; for checks)")
    g.add_argument("--interactive", action="store_true", help="keep a prompt loop open")
    g.add_argument("--escapes", action="store_true", help="interpret \\n in interactive prompts")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point ``lmforge``."""
    args = build_parser().parse_args(argv)
    if args.command in STAGES:
        run_stage(args.command, args.overrides)
    elif args.command == "compose":
        _guarded(lambda: _compose(args))
    elif args.command == "generate":
        _guarded(lambda: _generate(args))


if __name__ == "__main__":
    main()
