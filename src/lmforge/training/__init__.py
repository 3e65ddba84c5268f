"""Stage 4, train: a GPT trained with Lightning, one room per concern.

- ``optim``: the learning-rate schedule, AdamW/Muon and micro-batches per step (no Lightning).
- ``module``: the LightningModule, ``LitGPT``: a training step, validation, metrics per step.
- ``callbacks``: throughput and MFU, exact resume, ``last.ckpt`` and signals, atomic checkpoints.
- ``finetune``: a fine-tune's start: the base's architecture and weights (``finetune.base``).
- ``lora``: LoRA adapters (peft) injected, counted, merged and saved (``finetune.method=lora``).
- ``resume``: which checkpoint and MLflow run a ``train.resume=auto`` run continues.
- ``stage``: ``train(cfg)``, the stage itself, as a list of named steps.

Nothing here imports ``mlflow``: the run of a training lives behind ``lmforge.tracking.runs.TrainingRun``.
"""
