"""The pipeline's stages as DVC runs them: the stage runner and the ``check`` stage.

- ``runner``: ``run_stage(name)``, what ``pipelines/<stage>.py`` and ``lmforge <stage>`` call: read
  params.yaml (plus overrides), check what the stage reads, run the stage's function
  (``corpus.stage.prepare_stage``, ``tokenization.vocab.vocab_stage``, ...);
- ``check``: every check of a configuration, gathered from the packages they belong to, and the
  ``check`` stage's summary.

This package sits above every other one (it runs them all) and is apart from ``cli`` so that an
edit to a model tool (``lmforge generate``) re-runs no stage.
"""
