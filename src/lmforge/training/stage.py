"""The train stage: ``train_stage(cfg)`` reads the token files, builds the model, opens (or continues)
the MLflow run, runs Lightning's Trainer and writes the final weights as a model directory.

Surviving: ``checkpoints/last.ckpt`` is rewritten atomically every ``train.checkpoint_every``
steps, with the optimizer, schedule, random-number and data position in it; ``train.resume=auto``
(the default, so a plain ``dvc repro`` does it) continues an unfinished run of the same
configuration from it bit for bit, in the same MLflow run (``checkpoints/run.json``), which then
carries the name of the attempt that finished it and every setting that changed
(``TrainingRun.record_attempt``). The checkpoints of an unfinished run are never overwritten by a
new one: they are kept aside (``training.resume``). A non-finite loss stops the run (FAILED)
before a bad checkpoint is written; Ctrl-C or SIGTERM finishes the step, saves a checkpoint and
stops (KILLED; exit status 130 or 143). A resumed run logs no step that MLflow already holds.
"""

from __future__ import annotations

import signal
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import OmegaConf

from lmforge.config.paths import BASE_FILE, TOKENIZER_FILE
from lmforge.errors import LmforgeError
from lmforge.model.gpt import GPT, Block, GPTConfig
from lmforge.outputs import check_writable, watched
from lmforge.tokenization.base import read_record
from lmforge.tokenization.shards import read_index
from lmforge.tokenization.tokenizer import vocab_eot_token
from lmforge.tracking.runs import TrainingRun
from lmforge.training.callbacks import (
    AtomicCheckpointIO,
    ExactResume,
    FlushMetrics,
    LastCheckpoint,
    ProgressLines,
    Stopped,
    Throughput,
    TrainingInterrupted,
)
from lmforge.training.hardware import device_type_for, restored_matmul_precision, training_choices
from lmforge.training.lora import has_lora, merged_state_dict, trainable_counts
from lmforge.training.module import LitGPT, NonFiniteLoss
from lmforge.training.optim import accumulation_steps
from lmforge.training.resume import (
    LAST_CHECKPOINT,
    RUN_FILE,
    config_fingerprint,
    find_resume_point,
    mark_finished,
    start_afresh,
)


def train_stage(cfg, callbacks: list[Callback] | tuple = ()) -> Path:
    """Run the train stage for config ``cfg``; return the model directory it wrote.

    ``callbacks``: extra Lightning callbacks (tests and experiments hook in here). Raises
    LmforgeError for a bad setting or a non-finite loss (the MLflow run is then FAILED) and
    ``Stopped`` (a KeyboardInterrupt) after Ctrl-C or SIGTERM has saved a checkpoint (the run is
    then KILLED). torch's float32 matmul precision (``trainer.float32_matmul_precision``) is
    restored afterwards: in a notebook or a test session the next computation runs as before.
    """
    with restored_matmul_precision():
        return _train_stage(cfg, callbacks)


def _train_stage(cfg, callbacks) -> Path:
    from lmforge.training.data import TokenDataModule

    check_writable(("paths.model", cfg.paths.model),
                   ("paths.checkpoints", Path(cfg.paths.checkpoints) / LAST_CHECKPOINT))
    index = read_index(cfg.paths.tokens)
    choices = _set_up_torch(cfg, index)
    t = cfg.train
    datamodule = TokenDataModule(cfg.paths.tokens, int(cfg.model.block_size), int(t.batch_size), int(cfg.seed),
                                 int(t.eval_iters))
    datamodule.setup()  # fail on a too-short split before anything is created
    lit = _lightning_module(cfg, index)
    checkpoints = Path(cfg.paths.checkpoints)
    fingerprint = config_fingerprint(cfg, index)
    ckpt_path, record = find_resume_point(checkpoints, t.resume, fingerprint)
    if record is not None and str(cfg.trainer.precision) == "auto" and record.get("precision"):
        # auto is settled by a timing probe, which a busy machine may answer otherwise: a resumed
        # run keeps the precision it started with, so that it stays bit-identical.
        choices["hardware.precision"] = record["precision"]
    if record is not None and str(cfg.trainer.num_threads) == "auto" and record.get("num_threads"):
        # So is auto's thread count: torch's kernels do not give the same bits at every count.
        choices["hardware.num_threads"] = str(record["num_threads"])
        torch.set_num_threads(int(record["num_threads"]))
    run = _open_run(cfg, lit, record, fingerprint, choices) if rank_zero_only.rank == 0 else None  # rank 0: MLflow
    if run is not None and record is not None:
        print(f"resuming from {ckpt_path or 'step 0'} in MLflow run {run.info['run_id']} "
              f"(precision {choices['hardware.precision']}, {choices['hardware.num_threads']} threads)")
    trainer = _trainer(cfg, choices["hardware.precision"], run, [*callbacks, *_callbacks(cfg, run)])
    throughput = _steps_and_throughput(cfg, trainer)
    _compile(cfg, lit)
    _fit(trainer, lit, datamodule, ckpt_path, run, checkpoints, str(t.resume))
    # Until the model directory is written a rerun resumes here and only exports.
    trainer.save_checkpoint(checkpoints / LAST_CHECKPOINT, weights_only=False)
    # The last validation may fall before the last step: score the final weights too.
    if trainer.global_step % int(t.eval_interval) != 0:
        trainer.validate(lit, datamodule=datamodule, verbose=False)
    model_dir = _write_model_dir(cfg, trainer, lit, index, run, throughput)
    if run is not None:
        mark_finished(checkpoints)  # a later run of this configuration trains afresh
    return model_dir


# --- the steps of train(), in the order it takes them ------------------------------------------


def _set_up_torch(cfg, index: dict) -> dict[str, str]:
    """Threads, float32 matmul precision and every random seed, before anything is built; returns
    what this machine resolves (``trainer.precision=auto``, Muon's dtype: ``lmforge.training.hardware``;
    ``trainer.num_threads=auto``: ``lmforge.training.threads``)."""
    from lmforge.training.threads import resolve_threads

    _quiet_lightning()
    choices = training_choices(str(cfg.trainer.precision), str(cfg.trainer.accelerator),
                               str(cfg.trainer.float32_matmul_precision))
    torch.set_float32_matmul_precision(choices["hardware.float32_matmul_precision"])
    threads = resolve_threads(cfg.trainer.num_threads, device_type_for(str(cfg.trainer.accelerator)),
                              model_config_for(cfg, index["vocab_size"]), int(cfg.train.batch_size),
                              choices["hardware.precision"])
    torch.set_num_threads(threads.threads)
    choices["hardware.num_threads"] = str(threads.threads)
    rank_zero_only(print)(", ".join(f"{k.removeprefix('hardware.')} {v}" for k, v in choices.items()
                                    if k != "hardware.num_threads"))
    rank_zero_only(print)(f"threads: {threads.threads} ({threads.reason})")
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    return choices


def model_config_for(cfg, vocab_size: int) -> dict:
    """The GPT config dict: ``cfg.model`` plus the vocabulary size of the token files."""
    config = OmegaConf.to_container(cfg.model, resolve=True)
    config["vocab_size"] = int(vocab_size)
    try:
        GPTConfig.from_dict(config).validate()
    except ValueError as err:
        raise LmforgeError(str(err)) from None
    return config


def _lightning_module(cfg, index: dict) -> LitGPT:
    """The LitGPT of ``cfg.model`` at the token files' vocabulary size, from ``train.init_from``'s
    weights when set (fine-tuning a model directory of the same architecture); with
    ``finetune.base``, the base's architecture and weights, and LoRA adapters for ``finetune.method=lora``."""
    from lmforge.training.finetune import base_start, init_from_base, model_config_from_base

    t = cfg.train
    start = base_start(cfg)
    config = model_config_for(cfg, index["vocab_size"]) if start is None else \
        model_config_from_base(cfg, start, index["vocab_size"])
    lit = LitGPT(config, OmegaConf.to_container(cfg.optimizer, resolve=True), int(t.max_steps), int(t.log_every))
    if start is not None:
        init_from_base(lit.model, start)
        lit.base = start.base
        if cfg.finetune.method == "lora":
            from lmforge.training.lora import apply_lora

            apply_lora(lit.model, cfg.finetune, start.added_tokens)
            lit.lora_lr = float(cfg.finetune.lora.lr)
            lit.strict_loading = False  # its checkpoints hold only what trains (LitGPT.on_save_checkpoint)
    elif t.init_from:
        from lmforge.model.directory import init_from_model_dir

        init_from_model_dir(lit.model, t.init_from, Path(cfg.paths.vocab) / TOKENIZER_FILE)
    n_params, flops = lit.model.num_params(), lit.model.flops_per_token()
    line = f"model: {n_params / 1e6:.2f}M parameters, {flops / 1e6:.1f} MFLOP per token (training)"
    if start is not None:
        trainable, total = trainable_counts(lit.model)
        line += (f"; fine-tuning {start.base.ref} ({cfg.finetune.method}): {trainable:,} of {total:,} parameters "
                 f"train ({trainable / total:.2%})")
    rank_zero_only(print)(line)
    return lit


def _open_run(cfg, lit: LitGPT, record: dict | None, fingerprint: str, choices: dict[str, str]) -> TrainingRun:
    """Open the MLflow run (or continue ``record``'s), log a new run's parameters and step-0
    metrics or a continued run's new attempt, and name the run in ``checkpoints/run.json`` for a
    later ``train.resume=auto``."""
    from lmforge.config.compose import flat_params
    from lmforge.outputs import write_json
    from lmforge.tracking import lineage
    from lmforge.tracking.runs import reported_counts

    # In a sweep, the DVC experiment name is what `dvc exp show` lists: the same name in the UI.
    run_name = cfg.tracking.run_name or lineage.dvc_experiment() or f"{Path(cfg.paths.model).name}-{cfg.tokenizer.kind}"
    tags = lineage.run_tags(cfg)
    if lit.base is not None:
        tags.update(lit.base.tags())
    run = TrainingRun.open(cfg.tracking, run_name, tags, record)
    lit.metrics_log = run.metrics
    params = {**flat_params(cfg), **choices}
    checkpoints = Path(cfg.paths.checkpoints)
    if run.resumed:
        lineage_now = {key: tags.get(key) for key in lineage.lineage_tag_keys()}
        number, changes = run.record_attempt(params, lineage_now, run_name)
        print(f"attempt {number} of MLflow run {run_name}; changed since the last attempt: "
              f"{'; '.join(changes) or 'nothing'}")
    else:
        if record is None:  # before run.json names the new run: see find_resume_point
            start_afresh(checkpoints, str(cfg.train.resume), fingerprint)
        # The corpus and vocabulary counts (prepare's and vocab's DVC metrics) belong on the run too.
        trainable, total = trainable_counts(lit.model)
        model = {"model/parameters": lit.model.num_params(), "model/flops_per_token": lit.model.flops_per_token(),
                 "model/trainable_parameters": trainable, "model/trainable_fraction": trainable / total}
        run.log_start(params, {**model, **reported_counts(cfg.paths.reports)})
    write_json(checkpoints / RUN_FILE, {**run.info, "run_name": run_name, "fingerprint": fingerprint,
                                        "precision": choices["hardware.precision"],
                                        "num_threads": int(choices["hardware.num_threads"])})
    return run


def _callbacks(cfg, run: TrainingRun | None) -> list[Callback]:
    """Resume, metrics and early-stopping callbacks, then the checkpoint ones. Lightning runs
    checkpoint callbacks last, in this order: last.ckpt then holds the others' state after a step."""
    t = cfg.train
    checkpoints = Path(cfg.paths.checkpoints)
    chosen: list[Callback] = [ExactResume()]
    if run is not None:
        chosen.append(FlushMetrics(run.metrics))
    if t.early_stopping_patience:
        chosen.append(EarlyStopping(monitor="val/loss", mode="min", patience=int(t.early_stopping_patience)))
    return chosen + [
        ModelCheckpoint(dirpath=checkpoints, filename="best", monitor="val/loss", mode="min", save_top_k=1,
                        auto_insert_metric_name=False, enable_version_counter=False),
        LastCheckpoint(checkpoints / LAST_CHECKPOINT, int(t.checkpoint_every), int(t.eval_interval), int(t.log_every)),
    ]


def _trainer(cfg, precision: str, run: TrainingRun | None, callbacks: list[Callback]) -> L.Trainer:
    """Lightning's Trainer for ``cfg.trainer`` (at the resolved ``precision``) and ``cfg.train``,
    logging through ``run``."""
    t = cfg.train
    return L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        num_nodes=int(cfg.trainer.num_nodes),
        strategy=_strategy(cfg.trainer),
        precision=precision,
        max_steps=int(t.max_steps),
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        gradient_clip_val=float(t.grad_clip) if t.grad_clip else None,
        deterministic=bool(cfg.trainer.deterministic),
        logger=run.logger if run is not None else False,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        enable_progress_bar=watched(),  # else ProgressLines (_steps_and_throughput)
        enable_model_summary=False,
        enable_autolog_hparams=False,  # the whole config is logged once, by _open_run
    )


def _steps_and_throughput(cfg, trainer: L.Trainer) -> Throughput:
    """Micro-batches per optimizer step and the validation interval, which need the world size
    Lightning has just resolved (both are read when fitting starts); then the throughput meter."""
    t, block_size = cfg.train, int(cfg.model.block_size)
    accumulate = accumulation_steps(t.global_batch_tokens, int(t.batch_size), block_size, trainer.world_size)
    trainer.accumulate_grad_batches = accumulate
    trainer.val_check_interval = int(t.eval_interval) * accumulate  # counts micro-batches, not steps
    tokens_per_step = int(t.batch_size) * block_size * accumulate * trainer.world_size
    throughput = Throughput(tokens_per_step, int(t.log_every))
    trainer.callbacks.append(throughput)
    if not watched():  # no bar: plain progress lines (make run > log, queued experiments, CI)
        trainer.callbacks.append(ProgressLines(int(t.max_steps), tokens_per_step, threads=torch.get_num_threads()))
    if accumulate > 1:
        rank_zero_only(print)(f"global batch: {tokens_per_step} tokens per step "
                              f"({accumulate} micro-batches per device)")
    return throughput


def _compile(cfg, lit: LitGPT) -> None:
    """``trainer.compile``: in place, so parameter names (and checkpoints) stay the eager model's.
    Under FSDP each block, a unit of sharding, is compiled on its own (as torchtitan does)."""
    if cfg.trainer.compile:
        for module in lit.model.transformer.h if cfg.trainer.strategy == "fsdp" else [lit.model]:
            module.compile()


def _fit(trainer: L.Trainer, lit: LitGPT, datamodule, ckpt_path: Path | None, run: TrainingRun | None,
         checkpoints: Path, resume: str) -> None:
    """Train, turning how training ended into the run's status and one sentence for the user."""
    try:
        trainer.fit(lit, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except NonFiniteLoss as err:
        last = checkpoints / LAST_CHECKPOINT
        kept = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint was saved before it"
        raise LmforgeError(f"{err}, so training stopped and the MLflow run is marked FAILED; {kept}. "
                           "Lower optimizer.lr (or raise optimizer.warmup_steps) and train again.") from None
    except TrainingInterrupted as err:
        if run is not None:
            run.set_status("KILLED")
            how = "" if resume == "auto" else " with train.resume=auto"
            print(f"{err}: saved {checkpoints / LAST_CHECKPOINT}; run the train stage again{how} (dvc repro) "
                  "to continue from it", flush=True)
        raise Stopped(err.signum) from None
    except (KeyboardInterrupt, SystemExit) as err:  # Lightning: Ctrl-C is sys.exit(1), a 2nd SIGTERM SIGTERMException
        if run is not None:
            run.set_status("KILLED")
        raise Stopped(signal.SIGTERM if type(err).__name__ == "SIGTERMException" else signal.SIGINT) from None


def _write_model_dir(cfg, trainer: L.Trainer, lit: LitGPT, index: dict, run: TrainingRun | None,
                     throughput: Throughput) -> Path:
    """The final weights (whole, also from FSDP shards: every rank takes part) as a model
    directory with tokenizer, configs and loss curves; logged and registered in MLflow on request."""
    from lmforge.model.directory import save_model_dir

    state = trainer.strategy.lightning_module_state_dict()
    out = Path(cfg.paths.model)
    if trainer.global_rank != 0:
        return out
    model = GPT(lit.model.config)
    if has_lora(lit.model):  # the adapters merged: a plain model for generate, serve and export
        model.load_state_dict(merged_state_dict(lit.model))
    else:
        model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})  # as float32
    kind = cfg.tokenizer.kind if lit.base is None else read_record(cfg.paths.vocab)["tokenizer_kind"]
    tokenizer_meta = {"kind": kind, "eot_token": vocab_eot_token(cfg), "eot_id": index["eot_id"],
                      "sha256": index["tokenizer_sha256"]}
    training = {"steps": trainer.global_step, "tokens": trainer.global_step * throughput.tokens_per_step,
                "tokens_per_second": throughput.tokens_per_second}
    extra = {"training": training}
    if lit.base is not None:
        trainable, total = trainable_counts(lit.model)
        extra["finetune"] = {"base": lit.base.record(), "method": cfg.finetune.method,
                             "trainable_parameters": trainable, "parameters": total}
    save_model_dir(out, model, Path(cfg.paths.vocab) / TOKENIZER_FILE, tokenizer_meta, train_cfg=cfg,
                   run=run.info, extra=extra, write_more=_model_files_writer(cfg, lit))
    if cfg.tracking.log_model:
        from lmforge.serving.pyfunc import log_pyfunc_model
        from lmforge.tracking.runs import log_to_run

        log_to_run(run.info, artifact_dirs={"model": out})
        log_pyfunc_model(out, run.info, cfg.tracking.registered_model)  # servable as an MLflow pyfunc
    return out


# --- small pieces -------------------------------------------------------------------------------


def _model_files_writer(cfg, lit: LitGPT):
    """Curves; for a fine-tune its base's record (``base.json``), and LoRA's adapters in PEFT's format."""
    curves = _curves_writer(lit.history)

    def write(model_dir: Path) -> None:
        from lmforge.outputs import write_json

        curves(model_dir)
        if lit.base is None:
            return
        write_json(model_dir / BASE_FILE, lit.base.record())
        if has_lora(lit.model):
            from safetensors.torch import save_file

            from lmforge.config.paths import ADAPTER_CONFIG, ADAPTER_WEIGHTS
            from lmforge.training.lora import adapter_config, adapter_state_dict

            save_file(adapter_state_dict(lit.model), str(model_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
            write_json(model_dir / ADAPTER_CONFIG, adapter_config(cfg.finetune, lit.base.ref))

    return write


def _curves_writer(history: dict):
    def write(model_dir: Path) -> None:
        import csv

        out = model_dir / "curves"
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "train_loss.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "train_loss", "lr"])
            w.writerows(history["train"])
        with open(out / "val_loss.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "val_loss"])
            w.writerows(history["val"])

    return write


def _quiet_lightning() -> None:
    import logging
    import warnings

    # Lightning advertises its cloud logger on every run; we log to MLflow.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: not str(record.getMessage()).startswith("💡 Tip")
    )
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    # Our iterable data has no length and infinite epochs, by design.
    warnings.filterwarnings("ignore", message=".*Your `IterableDataset` has `__len__` defined.*")
    warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")


def _strategy(trainer_cfg):
    if trainer_cfg.strategy == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        # One FSDP unit per transformer block: parameters are gathered a block at a time.
        return FSDPStrategy(auto_wrap_policy={Block}, sharding_strategy=trainer_cfg.fsdp_sharding,
                            state_dict_type="full")
    return trainer_cfg.strategy
