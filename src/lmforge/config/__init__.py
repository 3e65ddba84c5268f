"""Configuration: ``conf/`` composed into params.yaml, overrides, and every check of a value.

- ``compose``: load params.yaml (plus ``key=value`` overrides), compose ``conf/`` as ``dvc exp run`` does;
- ``values``: the type rules of one value (an int that is not a bool, a number);
- ``checks``: every check of a composed configuration that needs no data and no accelerator.

Nothing here imports the model, the trainer or MLflow: every other package may import this one.
"""
