"""Stage 5, evaluate: validation loss, perplexity and bits per byte, samples, report and plots.

- ``stage``: the evaluate stage (metrics.json, samples, plots);
- ``metrics``: loss, perplexity and bits per byte of a stream of token ids;
- ``prompts``: where the samples start (the data config's prompts, else the validation text);
- ``report``: ``reports/report.md``;
- ``text``: ``lmforge evaluate --data`` (any text, scored by a model directory).
"""
