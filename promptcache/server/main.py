"""`promptcache serve`: listen at once, load the model and add schemas, serve until SIGTERM/SIGINT.

    promptcache serve --model smollm2-135m-instruct --schemas schemas/ --port 8000
    python -m promptcache serve --model tiny --port 0 --api-key "$KEY"      # port 0: any free port

The schema files are parsed first (a bad path or document fails before the model loads). Then the
server listens and prints its address; until the model and schemas are ready, `/health` answers
503 {"status": "loading", "progress": ...} and every other request 503 with `Retry-After: 2`.
On SIGTERM or SIGINT the server stops accepting connections, refuses new requests on open ones
(503), lets running requests finish for up to `--shutdown-grace-s`, stops the rest, and exits 0.
A second signal stops running requests at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import threading
from collections.abc import Sequence
from pathlib import Path

from ..engine.budget import DEFAULT_KV_BUDGET_BYTES, DEFAULT_PREFILL_CHUNK, SERVER_MODULE_BUDGET_BYTES
from ..errors import PromptCacheError
from ..markup.parse import is_pml, parse_schema
from ..markup.xmlsafe import prolog_end
from .config import ServerConfig, default_store_dir

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
    s.add_argument("--parallel", type=int, default=d.parallel,
                   help=f"requests generating at once, their decode steps one batched forward ({d.parallel})")
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
    s.add_argument("--max-connections", type=int, default=d.max_connections,
                   help="open connections; over it the oldest idle one is closed, or the new one gets 503 "
                        f"({d.max_connections})")
    s.add_argument("--header-timeout-s", type=float, default=d.header_timeout_s,
                   help=f"seconds a request's headers may take to arrive, in all ({d.header_timeout_s:g})")
    s.add_argument("--body-timeout-s", type=float, default=d.body_timeout_s,
                   help=f"seconds a request's body may take to arrive, in all; then 408 ({d.body_timeout_s:g})")
    s.add_argument("--keep-alive-s", type=float, default=d.keep_alive_s,
                   help=f"seconds an idle kept-alive connection stays open ({d.keep_alive_s:g})")
    s.add_argument("--stream-stall-s", type=float, default=d.stream_stall_s,
                   help="seconds, in all, a streaming client may leave the events unread before it is dropped "
                        f"and its slot freed ({d.stream_stall_s:g})")
    s.add_argument("--stream-buffer", type=int, default=d.stream_buffer,
                   help=f"events buffered between the engine and a streaming client ({d.stream_buffer})")
    s.add_argument("--threads", type=int,
                   help="torch threads per forward (default: one per free core, measured at start); on a busy "
                        "or shared CPU, 1 can be several times faster: parallel regions wait for every thread")
    s.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    e = p.add_argument_group("engine")
    e.add_argument("--store-dir", metavar="DIR",
                   help="persist module states there across restarts (default: modules/ in the cache directory)")
    e.add_argument("--no-store", action="store_true", help="keep module states in memory only")
    e.add_argument("--device-budget-bytes", type=int, help="module-store budget on the device (default: none)")
    e.add_argument("--host-budget-bytes", type=int, help="module-store budget in host memory (default: none)")
    e.add_argument("--module-budget-bytes", type=module_budget, default=SERVER_MODULE_BUDGET_BYTES, metavar="N",
                   help="bytes of module states all added schemas may need together; a schema past it is "
                        f"refused (default: {SERVER_MODULE_BUDGET_BYTES >> 30} GiB; 'none': unbounded)")
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
    e.add_argument("--kv-budget-bytes", type=int, default=DEFAULT_KV_BUDGET_BYTES, metavar="N",
                   help="request-cache memory running requests may reserve in all; a request that would "
                        f"pass it waits (default: {DEFAULT_KV_BUDGET_BYTES >> 30} GiB)")
    e.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK, metavar="TOKENS",
                   help="the most prompt tokens prefilled per step while other requests decode (each step "
                        "prefills about what takes as long as its decode step, so a long prompt at most about "
                        f"doubles their inter-token latency) ({DEFAULT_PREFILL_CHUNK})")
    e.add_argument("--recompute", type=float, metavar="FRACTION",
                   help="of a PML prompt's stale spliced tokens (skipped modules, another union member, "
                        "arguments), the fraction to recompute, 0..1 (default: the engine's, 0); a request's "
                        "\"recompute\" overrides it")


def module_budget(text: str) -> int | None:
    """`--module-budget-bytes`: a byte count >= 0, or "none"."""
    if text.strip().lower() == "none":
        return None
    value = int(text)  # argparse reports a ValueError as an invalid value
    if value < 0:
        raise ValueError(text)
    return value


def config_from_args(args: argparse.Namespace, model: str) -> ServerConfig:
    for name in ("parallel", "max_body_bytes", "max_tokens", "max_connections", "stream_buffer", "kv_budget_bytes",
                 "prefill_chunk"):
        if getattr(args, name) < 1:
            raise PromptCacheError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_queue < 0 or not 0 <= args.port <= 65535:
        raise PromptCacheError(f"--max-queue must be >= 0 and --port in [0, 65535], got {args.max_queue}, "
                               f"{args.port}")
    for name in ("header_timeout_s", "body_timeout_s", "keep_alive_s", "stream_stall_s", "shutdown_grace_s"):
        if not getattr(args, name) > 0:  # NaN too
            raise PromptCacheError(f"--{name.replace('_', '-')} must be > 0 seconds, got {getattr(args, name)}")
    base = Path(args.schema_base_dir) if args.schema_base_dir else None
    if base is not None and not base.is_dir():
        raise PromptCacheError(f"--schema-base-dir {str(base)!r} is not a directory")
    return ServerConfig(model_name=args.served_model_name or model, host=args.host, port=args.port,
                        api_key=args.api_key or None, parallel=args.parallel, max_queue=args.max_queue,
                        max_body_bytes=args.max_body_bytes, default_max_tokens=args.max_tokens,
                        enable_cache=not args.no_cache, schema_base_dir=base,
                        shutdown_grace_s=args.shutdown_grace_s, header_timeout_s=args.header_timeout_s,
                        body_timeout_s=args.body_timeout_s, keep_alive_s=args.keep_alive_s,
                        max_connections=args.max_connections, stream_buffer=args.stream_buffer,
                        stream_stall_s=args.stream_stall_s)


def engine_kwargs(args: argparse.Namespace) -> dict:
    store_dir = None if args.no_store else args.store_dir or default_store_dir()
    kwargs = dict(store_dir=store_dir, device_budget_bytes=args.device_budget_bytes,
                  host_budget_bytes=args.host_budget_bytes, prefix_cache=not args.no_prefix_cache,
                  ttl_s=args.ttl_s, int8_decode=args.int8_decode, compile_decode=args.compile_decode,
                  module_budget_bytes=args.module_budget_bytes, max_batch=args.parallel,
                  kv_budget_bytes=args.kv_budget_bytes, prefill_chunk=args.prefill_chunk,
                  response_cache_dir=args.response_cache_dir, response_match=args.response_match, progress=False)
    if args.prefix_budget_bytes is not None:  # else the engine's default bound
        kwargs["prefix_budget_bytes"] = args.prefix_budget_bytes
    if args.recompute is not None:  # else the engine's default
        if not 0 <= args.recompute <= 1:  # NaN too
            raise PromptCacheError(f"--recompute must be a fraction in [0, 1], got {args.recompute}")
        kwargs["recompute"] = args.recompute
    return kwargs


def schema_files(paths: Sequence[str]) -> list[Path]:
    """The files named, and in each directory named, every *.xml whose root element is <schema>; each one
    parsed (no model needed), so that a wrong path or a bad document fails before the model loads."""
    out = []
    for given in map(Path, paths):
        if given.is_dir():
            for path in sorted(given.glob("*.xml")):
                text = path.read_text(encoding="utf-8", errors="replace")
                if is_pml(text) and text.startswith("<schema", prolog_end(text)):
                    out.append(path)
        elif given.is_file():
            out.append(given)
        else:
            raise PromptCacheError(f"--schemas {str(given)!r}: no such file or directory")
    for path in out:
        parse_schema(path)
    return out


def run(args: argparse.Namespace, model: str) -> int:
    """Check the schemas, listen, load the model and add the schemas, serve until a signal; the exit code."""
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_args(args, model)
    kwargs = engine_kwargs(args)
    if args.threads is not None and args.threads < 1:
        raise PromptCacheError(f"--threads must be >= 1, got {args.threads}")
    files = schema_files(args.schemas)
    from .app import Startup, create_app  # NOTE: imported here: the CLI builds its parser without them

    startup = Startup(config)
    sock = _listen(config)
    loader = threading.Thread(target=load, args=(startup, args, model, kwargs, files), daemon=True,
                              name="promptcache-load")
    loader.start()
    return serve(create_app(startup), startup, sock)


def load(startup, args: argparse.Namespace, model: str, kwargs: dict, files: list[Path]) -> None:
    """Load the engine and add the schemas, telling `startup` how far it got; then serve with it."""
    try:
        startup.progress = f"loading the model {model} (importing torch)"
        from ..models.threads import configure_threads

        configure_threads(args.threads)  # --threads, else one per free core
        from ..engine.engine import Engine
        from .service import Service

        startup.progress = f"loading the model {model}"
        engine = Engine.from_pretrained(model, device=args.device, dtype=args.dtype, **kwargs)
        if args.compile_decode:
            startup.progress = "compiling the few-token and one-token steps (minutes on a small CPU)"
            logger.info(startup.progress)
            engine.warm_up()
        for i, path in enumerate(files, 1):
            startup.progress = f"adding schema {i}/{len(files)}: {path}"
            layout = engine.add_schema(path)
            logger.info("added schema %r from %s (%d modules)", layout.name, path, len(layout.modules))
        startup.progress = "ready"
        startup.service = Service(engine, startup.config)
        logger.info("ready")
    except Exception as e:  # noqa: BLE001 - reported on /health and in the log; the process exits
        startup.failed = str(e) if isinstance(e, PromptCacheError) else f"{type(e).__name__}: {e}"
        logger.error("could not start: %s", startup.failed, exc_info=not isinstance(e, PromptCacheError))
        os.kill(os.getpid(), signal.SIGTERM)


def _listen(config: ServerConfig) -> socket.socket:
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((config.host, config.port))
    except OSError as e:
        sock.close()
        raise PromptCacheError(f"cannot listen on {config.host}:{config.port}: {e.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(app, startup, sock: socket.socket) -> int:
    """Serve until SIGTERM/SIGINT, then shut down gracefully; 0 (2 when loading failed)."""
    import functools

    import uvicorn

    from .connection import ConnectionLimits, DrainingServer, GuardedH11Protocol

    config = startup.config
    limits = ConnectionLimits(config.header_timeout_s, config.max_connections)
    protocol = functools.partial(GuardedH11Protocol, limits=limits)
    server = DrainingServer(uvicorn.Config(app, http=protocol, lifespan="off", timeout_keep_alive=config.keep_alive_s,
                                           log_config=None, access_log=False,
                                           timeout_graceful_shutdown=config.shutdown_grace_s), startup)
    host, port = sock.getsockname()[:2]
    # NOTE: the one line on stdout; scripts (and the tests) wait for it to learn the port
    print(f"promptcache: serving {config.model_name} on http://{host}:{port}/v1", flush=True)
    server.run(sockets=[sock])
    service = startup.service
    if service is not None and not service.gate.wait_idle(5.0):
        service.aborting.set()
        service.gate.wait_idle(5.0)
    logger.info("stopped")
    return 2 if startup.failed else 0
