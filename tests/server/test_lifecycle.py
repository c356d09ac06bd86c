"""Server lifecycle: client disconnects, a full queue, src= confinement, and SIGTERM.

One tiny server with a single run slot and no queue (`--parallel 1 --max-queue 0`), so that one
long request fills it. The SIGTERM test ends the process: it runs last.
"""

from __future__ import annotations

import json
import signal
import time

import pytest

from .conftest import start_server

LONG = 3000  # tokens: long enough that a request still runs while the test acts on it


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("schema-base")
    (path / "part.txt").write_text("Text read from a file under the base directory.")
    (path.parent / "outside.txt").write_text("A file outside the base directory.")
    return path


@pytest.fixture(scope="module")
def server(base_dir):
    srv = start_server("--model", "tiny", "--parallel", "1", "--max-queue", "0", "--schema-base-dir", str(base_dir),
                       "--shutdown-grace-s", "300")
    yield srv
    srv.stop()
    assert "Traceback" not in srv.log_text()


def body(max_tokens: int, stream: bool, **extra) -> dict:
    return {"model": "tiny", "prompt": "Tell me a long story.", "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream, **extra}


def wait_until(predicate, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def running(server) -> int:
    return server.health()["requests"]["running"]


def start_long_request(server, stream: bool, max_tokens: int = LONG, **extra):
    """A long request in flight on its own connection, once the server runs it: (connection, response)."""
    conn = server.connection()
    conn.request("POST", "/v1/completions", json.dumps(body(max_tokens, stream, **extra)),
                 {"Content-Type": "application/json"})
    if stream:
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read(64)  # the first event: generation is under way
        return conn, resp
    assert wait_until(lambda: running(server) == 1)
    return conn, None


def test_schema_src_is_confined_to_the_operator_base_dir(server):
    inside = '<schema name="filed"><module name="doc" src="part.txt"/></schema>'
    posted = server.request("POST", "/v1/schemas", inside)
    assert posted.status == 200 and posted.json()["modules"][1]["tokens"] > 0
    outside = '<schema name="escape"><module name="doc" src="../outside.txt"/></schema>'
    refused = server.request("POST", "/v1/schemas", outside)
    assert refused.status == 400 and "outside the allowed directory" in refused.json()["error"]["message"]


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
def test_a_disconnect_stops_generation_and_frees_the_cache(server, stream):
    before = server.metrics()
    conn, _ = start_long_request(server, stream)
    idle_while_running = server.health()["cache"]["pool_idle_bytes"]
    conn.sock.close()  # the client goes away mid-generation
    conn.close()
    assert wait_until(lambda: running(server) == 0), "generation went on after the client left"
    after = server.metrics()
    assert after["promptcache_requests_cancelled_total"] == before["promptcache_requests_cancelled_total"] + 1
    assert after["promptcache_completion_tokens_total"] == before["promptcache_completion_tokens_total"]
    assert server.health()["cache"]["pool_idle_bytes"] > idle_while_running  # its request cache came back
    answer = server.request("POST", "/v1/completions", body(3, stream=False))
    assert answer.status == 200 and answer.json()["usage"]["completion_tokens"] == 3


def test_a_full_queue_answers_503_then_serves_again(server):
    conn, _ = start_long_request(server, stream=True)
    try:
        refused = server.request("POST", "/v1/completions", body(2, stream=False))
        assert refused.status == 503
        error = refused.json()["error"]
        assert error["code"] == "server_busy" and "1 requests running" in error["message"]
    finally:
        conn.close()
    assert wait_until(lambda: running(server) == 0)
    assert server.request("POST", "/v1/completions", body(2, stream=False)).status == 200


def test_sigterm_lets_the_running_request_finish_then_exits_0(server):
    n = 150  # a few seconds on a busy CPU: the signal arrives while it runs
    conn, resp = start_long_request(server, stream=True, max_tokens=n, stream_options={"include_usage": True})
    server.proc.send_signal(signal.SIGTERM)
    rest = resp.read().decode()  # the stream goes on to its end
    conn.close()
    events = [e.removeprefix("data: ") for e in rest.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]", events[-3:]
    assert "usage" in json.loads(events[-2]), events[-3:]
    usage = json.loads(events[-2])["usage"]
    assert usage["completion_tokens"] == n
    assert server.proc.wait(60) == 0
    log = server.log_text()
    assert "SIGTERM: shutting down" in log and log.index("SIGTERM") < log.index("stopped")
