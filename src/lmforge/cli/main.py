"""The ``lmforge`` command: pipeline stages (with ``key=value`` overrides) and model tools.

    lmforge prepare|vocab|tokenize|train|evaluate [key=value | group=choice ...]
    lmforge compose [overrides...]          rewrite params.yaml from conf/
    lmforge check [overrides...]            every check of the composed config (no data, no GPU)
    lmforge generate --model DIR|URI --prompt TEXT [sampling options]
    lmforge generate --model DIR|URI --chat [--prompt TEXT] [--system TEXT]
    lmforge evaluate --model DIR|URI --data FILE... [--mlflow]      score any text
    lmforge export --model DIR|URI --format hf OUT                 a transformers directory
    lmforge export --model DIR|URI --format gguf OUT.gguf [--dtype f32|f16|q8_0]   llama.cpp & co.
    lmforge export --model DIR|URI --adapter OUT                   a LoRA fine-tune's PEFT adapter
    lmforge import --format hf DIR OUT [--force]                   a transformers directory in
    lmforge import --format gguf FILE.gguf OUT [--force]           a GGUF file in
    lmforge runs list | runs show [RUN_ID]                         tracked runs and their lineage
    lmforge info [--json] [--probe-seconds S]                      this machine: CPU, bf16, versions, a probe

A model is named by its directory or an MLflow URI (runs:/<run_id>/model, models:/<name>/<version>).

A mistake the user can fix ends in one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lmforge.errors import LmforgeError
from lmforge.stages.runner import STAGES, guarded, run_stage


def _generate(args: argparse.Namespace) -> None:
    from lmforge.inference.sampling import sampling_config
    from lmforge.model.directory import fetch_model_dir, load_model_dir

    # Before loading the model: a typo should fail at once.
    sampling = sampling_config({"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                                "top_k": args.top_k, "top_p": args.top_p,
                                "repetition_penalty": args.repetition_penalty, "seed": args.seed,
                                "use_cache": not args.no_cache})
    if args.num_samples < 1:
        raise LmforgeError(f"--num-samples {args.num_samples} must be at least 1.")
    if args.prompt is None and not (args.interactive or args.chat):
        raise LmforgeError("give --prompt TEXT (or --interactive, or --chat).")
    loaded = load_model_dir(fetch_model_dir(args.model, args.tracking_uri))
    if args.chat:
        _chat(loaded, sampling, args)
    elif args.interactive:
        _interactive(loaded, sampling, args)
    else:
        _print_samples(loaded, args.prompt, sampling, args)


def _print_samples(loaded, prompt: str, sampling, args: argparse.Namespace) -> None:
    # The samples are one batch: the first streams as it is produced, the others print when it ends.
    from lmforge.inference.generation import stream_samples, unescape

    n = args.num_samples
    later = [""] * n

    def header(i: int) -> str:
        return f"--- sample {i + 1} ---\n" if n > 1 else ""

    stop = [unescape(s) for s in args.stop] if args.stop else None  # `--stop "\n\n"`: two newlines
    pieces = stream_samples(loaded, prompt, sampling, stop=stop, num_samples=n)  # checks the prompt
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


def _chat(loaded, sampling, args) -> None:
    """--chat: the reply to --prompt as a user message, or a conversation typed turn by turn; the
    model's own chat template (lmforge.inference.chat), as in training and in `lmforge serve`."""
    from lmforge.inference.chat import model_chat, stream_reply
    from lmforge.inference.generation import unescape

    chat = model_chat(loaded)
    messages = [{"role": "system", "content": unescape(args.system)}] if args.system else []
    if chat.name == "plain":
        print("lmforge: this model has no chat template (it was trained on plain text): "
              "its replies continue 'user: ...' lines.", file=sys.stderr)
    interactive = args.prompt is None
    if interactive:
        print("lmforge: chat; an empty line or Ctrl-D to quit.", file=sys.stderr)
    while True:
        if interactive:
            try:
                text = input("user> ")
            except EOFError:
                print(file=sys.stderr)
                return
            if not text:
                return
        else:
            text = args.prompt
        messages.append({"role": "user", "content": unescape(text) if args.escapes or not interactive else text})
        if interactive:
            sys.stdout.write("assistant> ")
        answer = ""
        for piece in stream_reply(loaded, messages, sampling, chat):
            answer += piece
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": answer})
        if not interactive:
            return


def _interactive(loaded, sampling, args) -> None:
    from lmforge.inference.generation import unescape

    print("lmforge: type a prompt, an empty line or Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            prompt = input("> ")
        except EOFError:
            break
        if not prompt:
            break
        prompt = unescape(prompt) if args.escapes else prompt
        try:
            _print_samples(loaded, prompt, sampling, args)
        except LmforgeError as err:  # e.g. a character the vocabulary lacks: say so, keep the loop
            print(f"error: {err}", file=sys.stderr)


def _evaluate_text(args: argparse.Namespace) -> None:
    import re
    from pathlib import Path

    from lmforge.evaluation.text import describe_metrics, evaluate_text, log_text_metrics
    from lmforge.model.directory import fetch_model_dir, load_model_dir
    from lmforge.outputs import write_json
    from lmforge.tracking.runs import quiet_mlflow_env

    quiet_mlflow_env()
    loaded = load_model_dir(fetch_model_dir(args.model, args.tracking_uri))
    metrics = evaluate_text(loaded, args.data, batch_size=args.batch_size, max_batches=args.max_batches)
    print(describe_metrics(args.model, metrics))
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

    from lmforge.interop.hf import export_hf
    from lmforge.model.directory import fetch_model_dir

    if args.adapter is not None:
        from lmforge.interop.adapter import export_adapter

        if args.format or args.out:
            raise LmforgeError("--adapter OUT writes the adapter alone; give either --adapter OUT or "
                               "--format FORMAT OUT.")
        out = export_adapter(fetch_model_dir(args.model, args.tracking_uri), args.adapter)
        print(f"wrote {out} (a PEFT adapter: peft.PeftModel.from_pretrained(model, '{out}') onto the base "
              "exported with --format hf)")
        return
    if not args.format or not args.out:
        raise LmforgeError("export needs --format hf|gguf and OUT (or --adapter OUT for a LoRA fine-tune's adapter).")
    if args.format == "gguf":
        from lmforge.interop.gguf import export_gguf

        out = export_gguf(fetch_model_dir(args.model, args.tracking_uri), args.out, args.dtype)
        print(f"wrote {out} ({args.dtype}; run it with llama.cpp, "
              "or transformers' from_pretrained(..., gguf_file=...))")
        return
    if args.dtype != "f32":
        raise LmforgeError(f"--dtype {args.dtype} applies to --format gguf only; --format hf writes float32.")
    out = export_hf(fetch_model_dir(args.model, args.tracking_uri), args.out)
    architecture = json.loads((out / "config.json").read_text())["architectures"][0]
    print(f"wrote {out} ({architecture}; load it with transformers.AutoModelForCausalLM.from_pretrained, "
          "which pip install 'lmforge[hf]' installs)")


def _import(args: argparse.Namespace) -> None:
    from lmforge.interop.hf import import_hf
    from lmforge.model.directory import load_model_dir

    if args.format == "gguf":
        from lmforge.interop.gguf import import_gguf

        out = import_gguf(args.hf_dir, args.out, force=args.force)
    else:
        out = import_hf(args.hf_dir, args.out, force=args.force)
    config = load_model_dir(out).model.config.to_dict()
    settings = " ".join(f"model.{k}={'null' if v is None else str(v).lower() if isinstance(v, bool) else v}"
                        for k, v in config.items() if k != "vocab_size")
    print(f"wrote {out}; to train it further on your corpus (tokenized with {out}/tokenizer.json):\n"
          f"  lmforge train train.init_from={out} {settings}")


def _compose(args: argparse.Namespace) -> None:
    from lmforge.config.compose import compose_config, write_params

    write_params(compose_config(args.overrides))
    print("wrote params.yaml")


def _check(args: argparse.Namespace) -> None:
    from pathlib import Path

    from lmforge.config.compose import CONF_DIR, compose_config, load_config
    from lmforge.stages.check import check_config, summary, summary_line

    # As `dvc exp run -S` composes (conf/ plus overrides); a project without conf/ has params.yaml only.
    cfg = compose_config(args.overrides) if (Path(CONF_DIR) / "config.yaml").is_file() else load_config(args.overrides)
    check_config(cfg)
    print(summary_line(summary(cfg)))


def _runs(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from lmforge.model.directory import RUN
    from lmforge.tracking.lineage import describe_run, list_runs
    from lmforge.tracking.runs import default_tracking_uri

    if args.runs_command == "list":
        from lmforge.config.compose import load_config

        experiment = args.experiment or load_config().tracking.experiment
        print(list_runs(args.tracking_uri or default_tracking_uri(), experiment, args.max_results))
        return
    if args.run_id:
        run_id, uri = args.run_id, args.tracking_uri or default_tracking_uri()
    else:  # the run of the project's current model
        from lmforge.config.compose import load_config

        run_file = Path(load_config().paths.model) / RUN
        if not run_file.is_file():
            raise LmforgeError(f"{run_file} not found; give a RUN_ID (see `lmforge runs list`) or train a model first.")
        run = json.loads(run_file.read_text())
        run_id, uri = run["run_id"], args.tracking_uri or run["tracking_uri"]
    print(describe_run(run_id, uri))


def _info(args: argparse.Namespace) -> None:
    import json

    from lmforge.training.hardware import format_info, machine_info
    from lmforge.training.threads import auto_for_info

    if args.probe_seconds < 0:
        raise LmforgeError(f"--probe-seconds {args.probe_seconds} must be 0 (no probe) or more.")
    info = machine_info(probe_seconds=args.probe_seconds)
    info["num_threads_auto"] = auto_for_info()
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
    p = sub.add_parser("check",
                       help="compose conf/ with overrides and run every check that needs no data or accelerator")
    p.add_argument("overrides", nargs="*", help="as for `dvc exp run -S`: key=value, group=choice, +key=value")

    _add_generate_parser(sub)
    _add_export_import_parsers(sub)
    _add_serve_parser(sub)
    _add_runs_and_info_parsers(sub)
    return parser


def _add_generate_parser(sub) -> None:
    """`lmforge generate`: sampling options, streaming, an interactive loop."""
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
    g.add_argument("--stop", action="append", default=None,
                   help="stop when this string is produced (repeatable; backslash escapes such as \\n are read)")
    g.add_argument("--no-cache", action="store_true", help="recompute the context every step (slow; for checks)")
    g.add_argument("--interactive", action="store_true", help="keep a prompt loop open")
    g.add_argument("--escapes", action="store_true", help="interpret \\n in interactive prompts")
    g.add_argument("--chat", action="store_true",
                   help="reply with the model's chat template: to --prompt as a user message, else a conversation loop")
    g.add_argument("--system", default=None, help="with --chat: a system message first")


def _add_export_import_parsers(sub) -> None:
    """`lmforge export` and `lmforge import`: transformers directories and GGUF files."""
    e = sub.add_parser("export", help="write a model directory as a transformers directory or a GGUF file")
    _add_model_arguments(e)
    e.add_argument("--format", choices=["hf", "gguf"],
                   help="hf: GPT2LMHeadModel or LlamaForCausalLM (loading it needs transformers: the `hf` extra); "
                   "gguf: one file for llama.cpp, Ollama, Candle, ... (needs the `gguf` extra)")
    e.add_argument("--dtype", default="f32", choices=["f32", "f16", "q8_0"], help="GGUF weight type (default f32)")
    e.add_argument("out", nargs="?", help="the directory (hf) or .gguf file (gguf) to write")
    e.add_argument("--adapter", metavar="OUT", help="write a LoRA fine-tune's adapters as a PEFT adapter directory "
                   "for the base exported with --format hf (instead of --format)")
    i = sub.add_parser("import",
                       help="turn a local transformers GPT-2/Llama directory or a GGUF file into a model directory")
    i.add_argument("--format", required=True, choices=["hf", "gguf"], help="gguf needs the `gguf` extra")
    i.add_argument("hf_dir", metavar="SOURCE", help="a transformers directory (config.json, safetensors weights, "
                   "tokenizer.json), or a gpt2/llama .gguf file")
    i.add_argument("out", help="the model directory to write")
    i.add_argument("--force", action="store_true",
                   help="replace OUT if it exists (atomically: the old directory stays until the new one is complete)")


def _add_serve_parser(sub) -> None:
    """`lmforge serve`: the OpenAI-compatible HTTP server (its options: lmforge.serving.launch)."""
    from lmforge.serving.launch import add_serve_arguments

    s = sub.add_parser("serve", help="serve a model with the OpenAI HTTP API (completions, chat, streaming, batching)")
    _add_model_arguments(s)
    add_serve_arguments(s)


def _add_runs_and_info_parsers(sub) -> None:
    """`lmforge runs list|show` and `lmforge info`."""
    r = sub.add_parser("runs", help="list tracked runs, or show one run's lineage, params and metrics")
    runs = r.add_subparsers(dest="runs_command", required=True)
    listing = runs.add_parser("list", help="the newest runs of the experiment (id, name, DVC experiment, val loss)")
    listing.add_argument("--experiment", help="default: tracking.experiment of ./params.yaml")
    listing.add_argument("--max-results", type=int, default=20)
    show = runs.add_parser("show", help="a run's git commit, DVC experiment, data hashes, params and metrics")
    show.add_argument("run_id", nargs="?", help="default: the run of the current model (paths.model/run.json)")
    for each in (listing, show):
        each.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else tracking.uri of ./params.yaml")
    n = sub.add_parser("info", help="this machine: CPU, SIMD level, native bf16, GPUs, versions, "
                       "what trainer.num_threads=auto chooses, a matmul probe")
    n.add_argument("--json", action="store_true", help="print the block as JSON (what benchmarks record)")
    n.add_argument("--probe-seconds", type=float, default=5.0, help="length of the matmul probe; 0: none")


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
        guarded(lambda: _evaluate_text(text_args))
        return
    args = build_parser().parse_args(argv)
    if args.command in STAGES:
        run_stage(args.command, args.overrides)
    elif args.command == "compose":
        guarded(lambda: _compose(args))
    elif args.command == "check":
        guarded(lambda: _check(args))
    elif args.command == "generate":
        guarded(lambda: _generate(args))
    elif args.command == "export":
        guarded(lambda: _export(args))
    elif args.command == "import":
        guarded(lambda: _import(args))
    elif args.command == "runs":
        guarded(lambda: _runs(args))
    elif args.command == "serve":
        from lmforge.serving.launch import serve

        guarded(lambda: serve(args))
    elif args.command == "info":
        guarded(lambda: _info(args))


if __name__ == "__main__":
    main()
