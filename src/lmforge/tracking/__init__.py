"""Where a number reaches MLflow, and where a result came from.

- ``runs``: the tracking URI, the training run (parameters, metrics per step, artifacts) and the
  counts of the data stages it logs;
- ``lineage``: git and DVC state of a run (commit, dirty files, data hashes) and ``lmforge runs``;
- ``attempts``: a run continued after an interruption: what each attempt changed, in params and tags.
"""
