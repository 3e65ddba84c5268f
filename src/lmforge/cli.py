"""The ``lmforge`` command: pipeline stages (with ``key=value`` overrides) and model tools.

    lmforge prepare|vocab|tokenize|train|evaluate [key=value | group=choice ...]
    lmforge compose [overrides...]          rewrite params.yaml from conf/
    lmforge generate --model DIR|URI --prompt TEXT [sampling options]
    lmforge evaluate --model DIR|URI --data FILE... [--mlflow]      score any text
    lmforge export --model DIR|URI --format hf OUT                 a transformers directory
    lmforge import --format hf DIR OUT                             a transformers directory in
    lmforge runs list | runs show [RUN_ID]                         tracked runs and their lineage
    lmforge info [--json] [--probe-seconds S]                      this machine: CPU, bf16, versions, a probe

A model is named by its directory or an MLflow URI (runs:/<run_id>/model, models:/<name>/<version>).

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
    except BrokenPipeError:  # `lmforge runs list | head`: the reader left, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)


def _generate(args: argparse.Namespace) -> None:
    from lmforge.generation import SamplingConfig
    from lmforge.modeldir import fetch_model_dir, load_model_dir

    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                              seed=args.seed, use_cache=not args.no_cache)
    sampling.validate()  # before loading the model: a typo should fail at once
    if args.num_samples < 1:
        raise LmforgeError(f"--num-samples {args.num_samples} must be at least 1.")
    if args.prompt is None and not args.interactive:
        raise LmforgeError("give --prompt TEXT (or --interactive).")
    loaded = load_model_dir(fetch_model_dir(args.model, args.tracking_uri))
    if args.interactive:
        _interactive(loaded, sampling, args)
    else:
        _print_samples(loaded, args.prompt, sampling, args)


def _print_samples(loaded, prompt: str, sampling, args: argparse.Namespace) -> None:
    # The samples are one batch: the first streams as it is produced, the others print when it ends.
    from lmforge.generation import stream_samples

    n = args.num_samples
    later = [""] * n

    def header(i: int) -> str:
        return f"--- sample {i + 1} ---\n" if n > 1 else ""

    pieces = stream_samples(loaded, prompt, sampling, stop=args.stop, num_samples=n)  # checks the prompt
    sys.stdout.write(header(0) + prompt)
    sys.stdout.flush()
    for sample, piece in pieces:
        if sample == 0:
            sys.stdout.write(piece)
            sys.stdout.flush()
        else:
            later[sample] += piece
    sys.stdout.write("\n" + "".join(f"{header(i)}{prompt}{later[i]}\n" for i in range(1, n)))
    sys.stdout.flush()


def _interactive(loaded, sampling, args) -> None:
    print("lmforge: type a prompt, an empty line or Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            prompt = input("> ")
        except EOFError:
            break
        if not prompt:
            break
        prompt = prompt.encode("utf-8").decode("unicode_escape") if args.escapes else prompt
        try:
            _print_samples(loaded, prompt, sampling, args)
        except LmforgeError as err:  # e.g. a character the vocabulary lacks: say so, keep the loop
            print(f"error: {err}", file=sys.stderr)


def _evaluate_text(args: argparse.Namespace) -> None:
    import re
    from pathlib import Path

    from lmforge.evaluation import evaluate_text, log_text_metrics
    from lmforge.modeldir import fetch_model_dir, load_model_dir
    from lmforge.outputs import write_json
    from lmforge.tracking import quiet_mlflow_env

    quiet_mlflow_env()
    loaded = load_model_dir(fetch_model_dir(args.model, args.tracking_uri))
    metrics = evaluate_text(loaded, args.data, batch_size=args.batch_size, max_batches=args.max_batches)
    print(f"{args.model} on {metrics['files']} file(s), {metrics['documents']} document(s):")
    for key in ("loss", "perplexity", "bits_per_byte", "tokens", "bytes", "unknown_tokens"):
        value = metrics[key]
        print(f"  {key:15} {value:.4f}" if isinstance(value, float) else f"  {key:15} {value}")
    if metrics["unknown_tokens"]:
        sys.stdout.flush()
        print(f"warning: {metrics['unknown_tokens']} tokens are <unk>: the text has characters or words outside "
              "the model's vocabulary, and the loss counts each as one ordinary token.", file=sys.stderr)
    if args.out:
        write_json(args.out, {"model": str(args.model), "data": args.data, **metrics})
    if args.mlflow:
        name = args.name or (Path(args.data[0]).stem if len(args.data) == 1 else "text")
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)  # MLflow's allowed metric-name characters
        run = log_text_metrics(loaded, metrics, name, args.tracking_uri, args.experiment)
        print(f"logged eval/{name}/* to MLflow run {run['run_id']}")


def _export(args: argparse.Namespace) -> None:
    import json

    from lmforge.hf import export_hf
    from lmforge.modeldir import fetch_model_dir

    out = export_hf(fetch_model_dir(args.model, args.tracking_uri), args.out)
    architecture = json.loads((out / "config.json").read_text())["architectures"][0]
    print(f"wrote {out} ({architecture}; load it with transformers.AutoModelForCausalLM.from_pretrained)")


def _import(args: argparse.Namespace) -> None:
    from lmforge.hf import import_hf
    from lmforge.modeldir import load_model_dir

    out = import_hf(args.hf_dir, args.out)
    config = load_model_dir(out).model.config.to_dict()
    settings = " ".join(f"model.{k}={'null' if v is None else str(v).lower() if isinstance(v, bool) else v}"
                        for k, v in config.items() if k != "vocab_size")
    print(f"wrote {out}; to train it further on your corpus (tokenized with {out}/tokenizer.json):\n"
          f"  lmforge train train.init_from={out} {settings}")


def _compose(args: argparse.Namespace) -> None:
    from lmforge.config import compose_config, write_params

    write_params(compose_config(args.overrides))
    print("wrote params.yaml")


def _runs(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from lmforge.lineage import describe_run, list_runs
    from lmforge.modeldir import RUN, default_tracking_uri

    if args.runs_command == "list":
        from lmforge.config import load_config

        experiment = args.experiment or load_config().tracking.experiment
        print(list_runs(args.tracking_uri or default_tracking_uri(), experiment, args.max_results))
        return
    if args.run_id:
        run_id, uri = args.run_id, args.tracking_uri or default_tracking_uri()
    else:  # the run of the project's current model
        from lmforge.config import load_config

        run_file = Path(load_config().paths.model) / RUN
        if not run_file.is_file():
            raise LmforgeError(f"{run_file} not found; give a RUN_ID (see `lmforge runs list`) or train a model first.")
        run = json.loads(run_file.read_text())
        run_id, uri = run["run_id"], args.tracking_uri or run["tracking_uri"]
    print(describe_run(run_id, uri))


def _info(args: argparse.Namespace) -> None:
    import json

    from lmforge.hardware import format_info, machine_info

    if args.probe_seconds < 0:
        raise LmforgeError(f"--probe-seconds {args.probe_seconds} must be 0 (no probe) or more.")
    info = machine_info(probe_seconds=args.probe_seconds)
    print(json.dumps(info, indent=2) if args.json else format_info(info))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmforge", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for stage in STAGES:
        p = sub.add_parser(stage, help=f"run the {stage} stage (reads params.yaml)"
                           + ("; with --model/--data, score any text (see `lmforge evaluate --help`)"
                              if stage == "evaluate" else ""))
        p.add_argument("overrides", nargs="*", help="key=value or group=choice")
    p = sub.add_parser("compose", help="rewrite params.yaml from conf/ (what `dvc exp run` does)")
    p.add_argument("overrides", nargs="*")

    g = sub.add_parser("generate", help="sample text from a model directory, streamed as it is produced")
    _add_model_arguments(g)
    g.add_argument("--prompt", help="text to continue")
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--num-samples", type=int, default=1, help="samples drawn as one batch; the first streams")
    g.add_argument("--stop", action="append", default=None, help="stop when this string is produced (repeatable)")
    g.add_argument("--no-cache", action="store_true", help="recompute the context every step (slow; for checks)")
    g.add_argument("--interactive", action="store_true", help="keep a prompt loop open")
    g.add_argument("--escapes", action="store_true", help="interpret \\n in interactive prompts")

    e = sub.add_parser("export", help="write a model directory as a transformers directory")
    _add_model_arguments(e)
    e.add_argument("--format", required=True, choices=["hf"], help="hf: GPT2LMHeadModel or LlamaForCausalLM")
    e.add_argument("out", help="the directory to write")
    i = sub.add_parser("import", help="turn a local transformers GPT-2/Llama directory into a model directory")
    i.add_argument("--format", required=True, choices=["hf"])
    i.add_argument("hf_dir", help="a transformers directory: config.json, safetensors weights, tokenizer.json")
    i.add_argument("out", help="the model directory to write")

    r = sub.add_parser("runs", help="list tracked runs, or show one run's lineage, params and metrics")
    runs = r.add_subparsers(dest="runs_command", required=True)
    listing = runs.add_parser("list", help="the newest runs of the experiment (id, name, DVC experiment, val loss)")
    listing.add_argument("--experiment", help="default: tracking.experiment of ./params.yaml")
    listing.add_argument("--max-results", type=int, default=20)
    show = runs.add_parser("show", help="a run's git commit, DVC experiment, data hashes, params and metrics")
    show.add_argument("run_id", nargs="?", help="default: the run of the current model (paths.model/run.json)")
    for each in (listing, show):
        each.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else tracking.uri of ./params.yaml")
    n = sub.add_parser("info", help="this machine: CPU, SIMD level, native bf16, GPUs, versions, a matmul probe")
    n.add_argument("--json", action="store_true", help="print the block as JSON (what benchmarks record)")
    n.add_argument("--probe-seconds", type=float, default=5.0, help="length of the matmul probe; 0: none")
    return parser


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="model directory (e.g. models/gpt), runs:/<run_id>/model or models:/<name>/<version>")
    parser.add_argument("--tracking-uri", help="MLflow store for runs:/ and models:/ (default: "
                        "$MLFLOW_TRACKING_URI, else tracking.uri of ./params.yaml)")


def build_evaluate_text_parser() -> argparse.ArgumentParser:
    """``lmforge evaluate --model ... --data ...``: the metrics of a model on any text."""
    parser = argparse.ArgumentParser(
        prog="lmforge evaluate",
        description="Loss, perplexity and bits per byte of a model on any text. Without --model/--data, "
                    "`lmforge evaluate [key=value ...]` runs the pipeline's evaluate stage instead.")
    _add_model_arguments(parser)
    parser.add_argument("--data", required=True, nargs="+", help="text files, directories or globs (.txt, .jsonl, ...)")
    parser.add_argument("--batch-size", type=int, help="windows of block_size tokens per forward pass")
    parser.add_argument("--max-batches", type=int, help="score at most this many batches (default: all the text)")
    parser.add_argument("--out", help="also write the metrics to this JSON file")
    parser.add_argument("--mlflow", action="store_true",
                        help="log eval/<name>/* onto the model's training run (run.json), or a new run")
    parser.add_argument("--name", help="the metrics' name in MLflow (default: the data file's stem, or 'text')")
    parser.add_argument("--experiment", help="experiment of the new run when the model has no run.json "
                        "(default: tracking.experiment of ./params.yaml)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point ``lmforge``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # `lmforge evaluate` with options scores any text; with key=value overrides it is the stage.
    if argv[:1] == ["evaluate"] and any(a.startswith("--") for a in argv[1:]):
        text_args = build_evaluate_text_parser().parse_args(argv[1:])
        _guarded(lambda: _evaluate_text(text_args))
        return
    args = build_parser().parse_args(argv)
    if args.command in STAGES:
        run_stage(args.command, args.overrides)
    elif args.command == "compose":
        _guarded(lambda: _compose(args))
    elif args.command == "generate":
        _guarded(lambda: _generate(args))
    elif args.command == "export":
        _guarded(lambda: _export(args))
    elif args.command == "import":
        _guarded(lambda: _import(args))
    elif args.command == "runs":
        _guarded(lambda: _runs(args))
    elif args.command == "info":
        _guarded(lambda: _info(args))


if __name__ == "__main__":
    main()
