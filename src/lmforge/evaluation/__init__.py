"""Stage 5, evaluate: validation loss, perplexity and bits per byte, samples, report and plots.

- ``stage``: the evaluate stage and ``lmforge evaluate --data`` (any text, scored by a model directory);
- ``report``: ``reports/samples.md`` and the loss curves as PNG plots.
"""
