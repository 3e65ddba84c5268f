"""Sampling from a trained model: one set of sampling settings, generation, continuous batching.

- ``generation``: ``SamplingConfig`` (temperature, top-k, top-p, repetition penalty, seed) and
  sampling one prompt at a time (``lmforge generate``, the evaluate stage's samples);
- ``kv_slots``: one KV cache of many independent slots;
- ``batching``: the engine that samples every running request together, one token a step (``lmforge serve``).
"""
