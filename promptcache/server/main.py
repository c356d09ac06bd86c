"""`promptcache serve`: load the model once, add schemas, serve until SIGTERM/SIGINT.

    promptcache serve --model smollm2-135m-instruct --schemas schemas/ --port 8000
    python -m promptcache serve --model tiny --port 0 --api-key "$KEY"      # port 0: any free port

On SIGTERM or SIGINT the server stops accepting connections, refuses new requests on open ones
(503), lets running requests finish for up to `--shutdown-grace-s`, stops the rest, and exits 0.
A second signal stops running requests at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import PromptCacheError
from ..markup.parse import is_pml
from ..markup.xmlsafe import prolog_end
from .config import ServerConfig

if TYPE_CHECKING:  # pragma: no cover
    from .http import Server

logger = logging.getLogger(__name__)

API_KEY_ENV = "PROMPTCACHE_API_KEY"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The server's and the engine's options (the model and device options are the CLI's)."""
    d = ServerConfig(model_name="")
    s = p.add_argument_group("server")
    s.add_argument("--schemas", nargs="+", default=[], metavar="FILE_OR_DIR",
                   help="schema files to add at start (a directory: each *.xml whose root is <schema>)")
    s.add_argument("--host", default=d.host, help=f"address to bind (default: {d.host}, this machine only)")
    s.add_argument("--port", type=int, default=d.port, help=f"default: {d.port}; 0 picks a free port")
    s.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}, else no key)")
    s.add_argument("--served-model-name", help="the model id clients send (default: the --model value)")
    s.add_argument("--parallel", type=int, default=d.parallel, help=f"requests generating at once ({d.parallel})")
    s.add_argument("--max-queue", type=int, default=d.max_queue,
                   help=f"requests waiting for a slot; more get 503 ({d.max_queue})")
    s.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="larger bodies get 413")
    s.add_argument("--max-tokens", type=int, default=d.default_max_tokens,
                   help=f"tokens generated when a request sets no max_tokens ({d.default_max_tokens})")
    s.add_argument("--no-cache", action="store_true",
                   help="prefill every prompt token of every request (the baseline for benchmarks)")
    s.add_argument("--schema-base-dir", metavar="DIR",
                   help="let schemas posted over HTTP read src= files from DIR (default: they cannot)")
    s.add_argument("--shutdown-grace-s", type=float, default=d.shutdown_grace_s,
                   help="on SIGTERM, how long running requests may take to finish")
    s.add_argument("--threads", type=int,
                   help="torch threads per forward (default: torch's, one per core); on a busy or shared CPU, "
                        "1 can be several times faster: parallel regions wait for every thread")
    s.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    e = p.add_argument_group("engine")
    e.add_argument("--store-dir", metavar="DIR", help="persist module states there across restarts")
    e.add_argument("--device-budget-bytes", type=int, help="module-store budget on the device (default: none)")
    e.add_argument("--host-budget-bytes", type=int, help="module-store budget in host memory (default: none)")
    e.add_argument("--prefix-budget-bytes", type=int,
                   help="bytes of chat/prompt prefixes kept, LRU (default: the engine's, 1 GiB)")
    e.add_argument("--no-prefix-cache", action="store_true", help="do not reuse prefixes of plain prompts/chats")
    e.add_argument("--ttl-s", type=float, help="drop cached states idle for longer than this")
    e.add_argument("--response-cache-dir", metavar="DIR",
                   help="answer repeated deterministic requests from completions cached there")
    e.add_argument("--response-match", choices=("exact", "normalized", "semantic"), default="exact",
                   help="which requests repeat one: the exact tokens (default), the text after clean-up "
                        "(case, whitespace, punctuation), or also the nearest by meaning (README: response reuse)")
    e.add_argument("--int8-decode", action="store_true",
                   help="decode steps read int8 copies of the linear weights (CPU, bfloat16: faster tokens/s)")
    e.add_argument("--compile-decode", action="store_true",
                   help="torch.compile the decode step and the few-token step (a question after a cached "
                        "context), compiled before serving (minutes on a small CPU): faster tokens/s and "
                        "cached time to first token")
    e.add_argument("--recompute", type=float, metavar="FRACTION",
                   help="of a PML prompt's stale spliced tokens (skipped modules, another union member, "
                        "arguments), the fraction to recompute, 0..1 (default: the engine's, 0); a request's "
                        "\"recompute\" overrides it")


def config_from_args(args: argparse.Namespace, model: str) -> ServerConfig:
    for name in ("parallel", "max_body_bytes", "max_tokens"):
        if getattr(args, name) < 1:
            raise PromptCacheError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_queue < 0 or not 0 <= args.port <= 65535:
        raise PromptCacheError(f"--max-queue must be >= 0 and --port in [0, 65535], got {args.max_queue}, "
                               f"{args.port}")
    base = Path(args.schema_base_dir) if args.schema_base_dir else None
    if base is not None and not base.is_dir():
        raise PromptCacheError(f"--schema-base-dir {str(base)!r} is not a directory")
    return ServerConfig(model_name=args.served_model_name or model, host=args.host, port=args.port,
                        api_key=args.api_key or None, parallel=args.parallel, max_queue=args.max_queue,
                        max_body_bytes=args.max_body_bytes, default_max_tokens=args.max_tokens,
                        enable_cache=not args.no_cache, schema_base_dir=base,
                        shutdown_grace_s=args.shutdown_grace_s)


def engine_kwargs(args: argparse.Namespace) -> dict:
    kwargs = dict(store_dir=args.store_dir, device_budget_bytes=args.device_budget_bytes,
                  host_budget_bytes=args.host_budget_bytes, prefix_cache=not args.no_prefix_cache,
                  ttl_s=args.ttl_s, int8_decode=args.int8_decode, compile_decode=args.compile_decode,
                  response_cache_dir=args.response_cache_dir, response_match=args.response_match, progress=False)
    if args.prefix_budget_bytes is not None:  # else the engine's default bound
        kwargs["prefix_budget_bytes"] = args.prefix_budget_bytes
    if args.recompute is not None:  # else the engine's default
        if not 0 <= args.recompute <= 1:  # NaN too
            raise PromptCacheError(f"--recompute must be a fraction in [0, 1], got {args.recompute}")
        kwargs["recompute"] = args.recompute
    return kwargs


def schema_files(paths: Sequence[str]) -> list[Path]:
    """The files named, and in each directory named, every *.xml whose root element is <schema>."""
    out = []
    for given in map(Path, paths):
        if not given.is_dir():
            out.append(given)
            continue
        for path in sorted(given.glob("*.xml")):
            text = path.read_text(encoding="utf-8", errors="replace")
            if is_pml(text) and text.startswith("<schema", prolog_end(text)):
                out.append(path)
    return out


def run(args: argparse.Namespace, model: str) -> int:
    """Load the model, add the schemas, serve until a signal; the exit code."""
    from ..engine.engine import Engine

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_args(args, model)
    if args.threads is not None:
        if args.threads < 1:
            raise PromptCacheError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    engine = Engine.from_pretrained(model, device=args.device, dtype=args.dtype, **engine_kwargs(args))
    if args.compile_decode:
        logger.info("compiling the few-token and one-token steps (minutes on a small CPU)")
        engine.warm_up()
    for path in schema_files(args.schemas):
        layout = engine.add_schema(path)
        logger.info("added schema %r from %s (%d modules)", layout.name, path, len(layout.modules))
    from .http import Server  # NOTE: imported here: the CLI builds its parser without torch
    from .service import Service

    server = Server(Service(engine, config))
    return serve(server)


def serve(server: Server) -> int:
    """Serve until SIGTERM/SIGINT, then shut down gracefully; returns 0."""
    service = server.service
    stopping = threading.Event()

    def on_signal(signum, frame):
        if stopping.is_set():
            service.aborting.set()  # a second signal: stop running requests now
            return
        stopping.set()
        logger.info("%s: shutting down", signal.Signals(signum).name)
        service.gate.close()
        threading.Thread(target=server.shutdown, daemon=True).start()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    host, port = server.server_address[:2]
    # NOTE: the one line on stdout; scripts (and the tests) wait for it to learn the port
    print(f"promptcache: serving {service.config.model_name} on http://{host}:{port}/v1", flush=True)
    server.serve_forever(poll_interval=0.2)
    server.server_close()
    grace = service.config.shutdown_grace_s
    if not service.gate.wait_idle(grace):
        logger.warning("requests still running after %.0f s: stopping them", grace)
        service.aborting.set()
        service.gate.wait_idle(5.0)
    logger.info("stopped")
    return 0
