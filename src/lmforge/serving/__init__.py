"""Serving a model directory: the OpenAI HTTP API and the MLflow pyfunc model.

- ``protocol``: the OpenAI request and response shapes, checked at the edge;
- ``server``: ``lmforge serve`` (FastAPI + uvicorn) over the continuous-batching engine;
- ``pyfunc``: the model as an MLflow pyfunc (``mlflow models serve``).
"""
