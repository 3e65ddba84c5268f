"""Configuration: ``conf/`` composed into params.yaml, overrides, and every check of a value.

- ``compose``: load params.yaml (plus ``key=value`` overrides), compose ``conf/`` as ``dvc exp run`` does;
- ``values``: the type rules of one value (an int that is not a bool, a number, ``same_kind``);
- ``rules``: the range of every numeric setting (one table) and the few rules across settings;
- ``checks``: the checks of a composed configuration that need no data, no accelerator and no model;
- ``paths``: the one table of the pipeline's paths and file names.

Nothing here imports the model, the trainer or MLflow: every other package may import this one.
"""
