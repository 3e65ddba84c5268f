"""The ``lmforge`` command: one dispatch table over the stages and the model tools.

``main``: ``lmforge <command>``; the stages themselves run through ``lmforge.stages.runner``.
"""
