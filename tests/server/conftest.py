"""A real `promptcache serve` process on a free loopback port, and ways to talk to it.

`start_server(*args)` runs `python -m promptcache serve --port 0 ...` and waits for the line it prints
once listening, which names the port the kernel picked (no race for a "free" port). Clients: the
official `openai` package, and raw `http.client` for what the client would refuse to send.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
READY = re.compile(r"serving (\S+) on http://([^:/]+):(\d+)/v1")
START_TIMEOUT_S = 300  # loading torch on a busy machine; the real model converts once


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    host: str
    port: int
    model: str
    key: str | None
    log: Path

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def client(self, **kwargs):
        import openai

        kwargs.setdefault("api_key", self.key or "none")
        return openai.OpenAI(base_url=self.base_url, max_retries=0, **kwargs)

    def connection(self, timeout: float = 120) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def request(self, method: str, path: str, body: bytes | str | dict | list | None = None, *,
                key: str | None = "default", headers: dict | None = None) -> Response:
        """One raw request on a new connection; `key` "default" sends the server's key, None none."""
        key = self.key if key == "default" else key
        headers = dict(headers or {})
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
        if isinstance(body, str):
            body = body.encode()
        conn = self.connection()
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            return Response(resp.status, resp.msg, resp.read())
        finally:
            conn.close()

    def health(self) -> dict:
        return self.request("GET", "/health", key=None).json()

    def metrics(self) -> dict[str, float]:
        """Every sample of GET /metrics: 'name{labels}' (or 'name') -> value."""
        text = self.request("GET", "/metrics").body.decode()
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line and not line.startswith("#")}

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        return self.proc.returncode


@dataclass
class Response:
    status: int
    headers: dict
    body: bytes

    def json(self):
        return json.loads(self.body)


def start_server(*args: str, key: str | None = None, wait_ready: bool = True) -> ServerProcess:
    """`promptcache serve ARGS --port 0` (plus `--api-key key`), listening, and (`wait_ready`) loaded."""
    log = Path(tempfile.mkstemp(prefix="promptcache-serve-", suffix=".log")[1])
    cmd = [sys.executable, "-m", "promptcache", "serve", "--port", "0", "--device", "cpu", *args]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    env.pop("PROMPTCACHE_API_KEY", None)
    if key is not None:
        env["PROMPTCACHE_API_KEY"] = key  # not on the command line: ps shows that
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, env=env)
    line = _ready_line(proc, log)
    model, host, port = READY.search(line).groups()
    server = ServerProcess(proc, host, int(port), model, key, log)
    if wait_ready:
        _wait_ready(server)
    return server


def _wait_ready(server: ServerProcess) -> None:
    """The server listens at once and answers /health 503 "loading" until the model is ready."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        resp = server.request("GET", "/health", key=None)
        if resp.status == 200:
            return
        assert resp.status == 503 and resp.json()["status"] == "loading", resp.body
        if server.proc.poll() is not None:
            break
        time.sleep(0.1)
    server.proc.kill()
    raise RuntimeError(f"the server did not get ready; log:\n{server.log_text()[-3000:]}")


def _ready_line(proc: subprocess.Popen, log: Path) -> str:
    deadline, buf = time.monotonic() + START_TIMEOUT_S, b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 4096)
            buf += chunk
            if READY.search(buf.decode(errors="replace")):
                return buf.decode()
            if not chunk and proc.poll() is not None:
                break
        elif proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(f"the server did not start (exit {proc.poll()}); stdout {buf!r}; log:\n"
                       f"{log.read_text(errors='replace')[-3000:]}")


def served(*args: str, **kwargs):
    """The body of a module-scoped server fixture (`yield from served(...)`): a server started with `args`
    for the module, which must then stop cleanly (exit 0) with no traceback in its log."""
    srv = start_server(*args, **kwargs)
    yield srv
    assert srv.stop() == 0, srv.log_text()[-2000:]
    assert "Traceback" not in srv.log_text()  # no unhandled error on the server side either
