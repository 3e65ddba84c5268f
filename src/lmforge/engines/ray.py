"""The Ray engine (``data.engine=ray``): a function run over items as Ray tasks, results in input order.

A stage hands it a function and a stream of items, as it would the local engines
(``lmforge.engines.local``); this module only connects to Ray, hands the items out and takes the results
back *in input order*, so the stage's own process writes the same bytes as locally, however many
workers run and in whatever order tasks finish. The function is put in Ray's object store once and
installed once per worker process (not sent, nor unpickled, per task), so what it loads stays loaded.

Ray retries a task whose worker died (``max_retries``), so a killed worker costs time, not bytes.
Memory: the stage's process holds at most ``look_ahead(workers)`` results in flight. Tasks are named
after the stage (``ray::prepare``, ``ray::tokenize`` in ``ray status`` and the process list).

Ray itself is imported only here and only when this engine is opened (it is the ``lmforge[ray]`` extra).
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import urlsplit

from lmforge.engines.workers import WorkerSide, in_order, look_ahead, trimmed, workers_of
from lmforge.errors import LmforgeError, missing_extra

# Seconds to wait for a cluster's address to answer, then for Ray to join it, before one sentence.
_CONNECT_SECONDS = 5
_JOIN_SECONDS = 15
# Object store of a local Ray started by the stage: results stream through it a few at a time.
_LOCAL_OBJECT_STORE_BYTES = 512 << 20
_RETRIES = 3


class RayEngine:
    """``function`` run as Ray tasks named ``name``, on ``data.ray_address`` (null: a local Ray started here
    and stopped at ``close``), ``data.workers`` tasks at a time (null: the cluster's CPUs). A Ray already
    initialised in this process is used as it is."""

    in_process = False

    def __init__(self, function: Callable[[Any], Any], data_cfg, name: str):
        try:
            import ray  # the optional lmforge[ray] extra
        except ImportError:
            raise missing_extra("data.engine=ray", "ray", "or set data.engine=local") from None
        self.ray = ray
        self.started = False
        address = data_cfg.get("ray_address")
        if not ray.is_initialized():
            start = time.perf_counter()
            if address in (None, "", "local"):
                ray.init(num_cpus=workers_of(data_cfg),
                         object_store_memory=_LOCAL_OBJECT_STORE_BYTES, include_dashboard=False,
                         logging_level=logging.WARNING, log_to_driver=True)
            else:
                _connect(ray, str(address))
            self.started = True
        self.workers = int(data_cfg.get("workers") or ray.cluster_resources().get("CPU", 1))
        if self.started:
            where = "a local Ray" if address in (None, "", "local") else f"the Ray cluster at {address}"
            print(f"ray: {where} with {ray.cluster_resources().get('CPU', 0):g} CPUs ready in "
                  f"{time.perf_counter() - start:.1f} s; {self.workers} tasks at a time", file=sys.stderr, flush=True)
        self.task = ray.remote(_run_task).options(name=name, max_retries=_RETRIES)
        # Put once; a worker fetches it on its first task only (a reference inside a list is not resolved by Ray).
        self.function = (uuid.uuid4().hex, [ray.put(function)])

    def map(self, items: Iterable) -> Iterator:
        """``function(item)`` for each item, computed in Ray tasks, results in input order."""
        return trimmed(in_order(lambda item: self.task.remote(*self.function, item), self._get, items,
                                look_ahead(self.workers), cancel=lambda ref: self.ray.cancel(ref, force=True)))

    def close(self) -> None:
        """Disconnect (and stop the local Ray) if this engine started it."""
        if self.started:
            self.ray.shutdown()
            self.started = False

    def __enter__(self) -> RayEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _get(self, ref):
        ray = self.ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as err:
            if isinstance(err.cause, LmforgeError):
                raise err.cause from None
            raise
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError) as err:
            raise LmforgeError(f"a Ray worker failed {_RETRIES + 1} times on the same task ({type(err).__name__}); "
                               "check the cluster's memory and logs (ray status) and rerun the stage.") from None


# The function installed in this process when it is a Ray worker.
_worker = WorkerSide()


def _run_task(key: str, function_ref: list, item: Any) -> Any:
    """(A Ray task.) The engine's function applied to ``item``; the function is fetched on a worker's first task."""
    if _worker.key != key:
        import ray  # the optional lmforge[ray] extra (in a Ray worker, imported already)

        _worker.install(key, ray.get(function_ref[0]))
    return _worker.run(item)


def _connect(ray, address: str) -> None:
    """``ray.init(address)``, or one sentence within ``_CONNECT_SECONDS + _JOIN_SECONDS`` (20 s) when no
    Ray cluster answers there."""
    fix = "start the cluster (ray start --head) or fix data.ray_address (null starts a local Ray)"
    if address != "auto":
        parts = urlsplit(address if "://" in address else f"gcs://{address}")
        try:
            host, port = parts.hostname, parts.port or (10001 if parts.scheme == "ray" else 6379)
        except ValueError:
            raise LmforgeError(f"data.ray_address='{address}' is not auto, host:port or ray://host:port; "
                               f"{fix}.") from None
        try:
            socket.create_connection((host, port), timeout=_CONNECT_SECONDS).close()
        except OSError as err:
            raise LmforgeError(f"data.ray_address='{address}': nothing answers at {host}:{port} ({err}); "
                               f"{fix}.") from None
    # Something may answer the port and never speak Ray (a proxy, another service): ray.init would then
    # wait for minutes, so it runs in a thread given _JOIN_SECONDS (the stage ends on the error anyway).
    outcome: list = []
    joining = threading.Thread(target=_init, args=(ray, address, outcome), daemon=True)
    joining.start()
    joining.join(_JOIN_SECONDS)
    if not outcome:
        raise LmforgeError(f"data.ray_address='{address}': something answers there but no Ray cluster joined within "
                           f"{_JOIN_SECONDS} s; {fix}.")
    err = outcome[0]
    if err is not None:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LmforgeError(f"data.ray_address='{address}': cannot join the Ray cluster ({first}); check that it is up "
                           "(ray status), runs this Ray version, and, if it uses token authentication, that "
                           "RAY_AUTH_MODE=token and its token (~/.ray/auth_token) are set here.") from None


def _init(ray, address: str, outcome: list) -> None:
    try:
        # ERROR: in a thread Ray warns that it cannot set its SIGTERM handler, which is harmless here.
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=True)
        outcome.append(None)
    except Exception as err:  # reported by _connect as one sentence
        outcome.append(err)
