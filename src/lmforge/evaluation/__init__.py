"""Stage 5, evaluate: validation loss, perplexity and bits per byte, samples, report and plots.

- ``metrics``: the loss, perplexity and bits per byte of a model on a stream of token ids;
- ``stage``: the evaluate stage (the validation split, samples, plots, ``reports/metrics.json``);
- ``text``: ``lmforge evaluate --data`` (any text, read as a corpus is, scored by a model directory);
- ``report``: ``reports/report.md`` and the loss curves as PNG plots.
"""
