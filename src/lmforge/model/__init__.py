"""The model: a GPT in one file, its hyperparameters, and the directory a trained one lives in.

- ``config``: ``GPTConfig``, the hyperparameters and their checks;
- ``gpt``: the GPT itself (embeddings, positions, causal self-attention, MLP, norms, LM head, KV cache);
- ``directory``: the model directory (safetensors weights, config, tokenizer, training config,
  its MLflow run) that every later command takes.
"""
