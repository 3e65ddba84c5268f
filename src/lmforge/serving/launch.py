"""``lmforge serve``'s flags and start: API keys, TLS, limits, the warning for an open address, uvicorn.

Keys come from ``--api-key KEY``, the ``LMFORGE_API_KEY`` environment variable and ``--api-key-file
FILE`` (one key per line; blank lines and lines starting with ``#`` skipped), all together: any of
them opens the API. With none, the API is open to whoever reaches the address, and binding to
an address other than loopback prints a warning saying so. ``--ssl-keyfile``/``--ssl-certfile``
are uvicorn's TLS options, passed through.

The module imports only the standard library at the top: the CLI builds its parser from it.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

from lmforge.errors import LmforgeError

KEY_ENV = "LMFORGE_API_KEY"
LIMIT_FLAGS = {  # Limits field -> (type, help)
    "max_prompt_tokens": (int, "refuse longer prompts (default: 4 x block_size)"),
    "max_prompt_chars": (int, "refuse prompts of more characters before tokenizing them (default: "
                              "max-prompt-tokens x the longest token's characters x 2)"),
    "max_tokens": (int, "the largest max_tokens a request may ask (default: block_size, the model's context)"),
    "max_n": (int, "the largest n (and best_of) a request may ask (default: 8, at most --max-batch)"),
    "max_prompts": (int, "prompts in one completions request (default: 32)"),
    "max_body_bytes": (int, "refuse larger request bodies with a 413 (default: 4 MiB)"),
    "max_queue": (int, "requests waiting for a slot before new ones get a 503 (default: 128)"),
    "queue_timeout": (float, "seconds a request may wait for a slot before a 503 (default: 30)"),
    "header_timeout": (float, "seconds a client has to send its request line and headers (default: 10)"),
    "body_timeout": (float, "seconds a client has to send its request body before a 408 (default: 30)"),
    "max_connections": (int, "open connections before new requests get a 503 (default: 1000)"),
}


def add_serve_arguments(s: argparse.ArgumentParser) -> None:
    """The options of ``lmforge serve`` (besides ``--model`` and ``--tracking-uri``)."""
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--name", help="the model's name in the API (default: the directory's name, or the URI)")
    s.add_argument("--max-batch", type=int, default=32, help="samples decoded together (KV cache slots)")
    s.add_argument("--threads", type=int, help="torch threads for the model (default: torch's choice)")
    s.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' (also: ${KEY_ENV}, --api-key-file)")
    s.add_argument("--api-key-file", help="a file of API keys, one per line (# comments), for several users")
    s.add_argument("--ssl-keyfile", help="serve HTTPS: the private key (PEM)")
    s.add_argument("--ssl-certfile", help="serve HTTPS: the certificate chain (PEM)")
    s.add_argument("--no-access-log", action="store_true", help="no line per request on stderr")
    for name, (kind, text) in LIMIT_FLAGS.items():
        s.add_argument("--" + name.replace("_", "-"), type=kind, help=text)


def read_keys(api_key: str | None, key_file: str | None, environ=os.environ) -> frozenset[str]:
    """The API keys from the flag, the environment variable and the key file (empty: no key needed)."""
    keys = [k for k in (api_key, environ.get(KEY_ENV)) if k]
    if key_file:
        try:
            lines = Path(key_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise LmforgeError(f"cannot read the API key file {key_file} ({err}); give a UTF-8 file of one key "
                               "per line.") from None
        found = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
        if not found:
            raise LmforgeError(f"the API key file {key_file} holds no key; put one key per line in it.")
        keys += found
    bad = [k for k in keys if any(c.isspace() for c in k)]
    if bad:
        raise LmforgeError("an API key may not contain spaces; check --api-key, $LMFORGE_API_KEY and the key file.")
    return frozenset(keys)


def exposure_warning(host: str, keys: frozenset[str], tls: bool) -> str | None:
    """The warning for serving ``host`` without keys, or None when the address is loopback or a key is needed."""
    if keys or host in ("localhost", ""):
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        pass  # a host name: it may resolve to anything
    plain = "" if tls else ", in plain HTTP"
    return (f"warning: serving on {host} without an API key{plain}: anyone who can reach this address can sample "
            "from the model, read its name, tokenizer and metrics, and use its CPU; give --api-key, "
            f"${KEY_ENV} or --api-key-file (and TLS or a reverse proxy for traffic leaving this machine).")


def serve(args: argparse.Namespace) -> None:
    """Load the model of ``args`` (a directory or an MLflow URI) and serve it until interrupted."""
    # Imported here, not at the top: the CLI imports this module for its flags, and these take seconds.
    import logging

    import torch
    import uvicorn

    from lmforge.model.directory import fetch_model_dir, is_mlflow_uri, load_model_dir
    from lmforge.serving.guards import ACCESS_LOG, header_timeout_protocol
    from lmforge.serving.limits import Limits
    from lmforge.serving.server import create_app

    if args.max_batch < 1:
        raise LmforgeError(f"--max-batch {args.max_batch} must be at least 1.")
    if args.threads is not None:
        if args.threads < 1:
            raise LmforgeError(f"--threads {args.threads} must be at least 1.")
        torch.set_num_threads(args.threads)
    if bool(args.ssl_keyfile) != bool(args.ssl_certfile):
        raise LmforgeError("give both --ssl-keyfile and --ssl-certfile for HTTPS, or neither.")
    for path in (args.ssl_keyfile, args.ssl_certfile):
        if path and not Path(path).is_file():
            raise LmforgeError(f"the TLS file {path} does not exist; give the PEM files of the key and certificate.")
    keys = read_keys(args.api_key, args.api_key_file)
    loaded = load_model_dir(fetch_model_dir(args.model, args.tracking_uri))
    limits = Limits.for_model(loaded, args.max_batch, **{name: getattr(args, name) for name in LIMIT_FLAGS})
    name = args.name or (args.model if is_mlflow_uri(args.model) else Path(args.model).resolve().name)
    app = create_app(loaded, name, args.max_batch, limits, keys)
    if not args.no_access_log:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        ACCESS_LOG.addHandler(handler)
        ACCESS_LOG.setLevel(logging.INFO)
    tls = bool(args.ssl_certfile)
    warning = exposure_warning(args.host, keys, tls)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    scheme = "https" if tls else "http"
    print(f"lmforge: serving {name!r} on {scheme}://{args.host}:{args.port}/v1 (OpenAI API; "
          f"{'API key needed' if keys else 'no API key'}; Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", http=header_timeout_protocol(
        limits.header_timeout), limit_concurrency=limits.max_connections, ssl_keyfile=args.ssl_keyfile,
        ssl_certfile=args.ssl_certfile)
