"""A hostile client against `promptcache serve`: slow headers, idle sockets, slow bodies, a stream nobody
reads, malformed JSON, half-closed connections, and bodies of every wrong shape. Each finding of
issue 28 is a test here; the server keeps serving everyone else and never answers 500.

One tiny server with small, settable limits (a cap of 8 connections, 2 s for headers, 2 s for a body,
2 s of stalled streaming) so that every limit is reached within seconds.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from .conftest import ROOT, served, start_server

CAP = 8
LIMITS = ("--max-connections", str(CAP), "--header-timeout-s", "2", "--body-timeout-s", "2",
          "--stream-stall-s", "2", "--stream-buffer", "4", "--parallel", "1", "--max-queue", "4")
KEY = "hostile-test-key"
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def server():
    yield from served("--model", "tiny", *LIMITS, key=KEY)


def raw_socket(server, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(30)
    sock.connect((server.host, server.port))
    return sock


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def http_request(path: str, body: bytes, key: str = KEY, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


def test_slow_headers_and_idle_sockets_do_not_keep_others_out(server):
    """300 trickling sockets used to take every connection thread: everyone else got 503 for minutes."""
    slow = [raw_socket(server) for _ in range(CAP)]
    idle = [raw_socket(server) for _ in range(CAP)]  # over the cap: each closes an older idle one
    for sock in slow:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\n")
    t0 = time.monotonic()
    answer = server.request("POST", "/v1/chat/completions", CHAT)
    assert answer.status == 200, answer.body
    assert time.monotonic() - t0 < 2, "the request waited for the header deadline instead of shedding an idle socket"
    # a trickle does not extend the deadline: one byte every 0.3 s, closed after ~2 s all the same
    survivor = raw_socket(server)
    survivor.sendall(b"GET /health HTTP/1.1\r\n")
    closed_after = None
    for _ in range(40):
        time.sleep(0.3)
        try:
            survivor.sendall(b"X")
        except OSError:
            closed_after = time.monotonic() - t0
            break
        survivor.settimeout(0.01)
        try:
            if survivor.recv(1) == b"":
                closed_after = time.monotonic() - t0
                break
        except (TimeoutError, BlockingIOError):
            pass
    assert closed_after is not None and closed_after < 8, "a trickling client kept its connection"
    for sock in slow + idle + [survivor]:
        sock.close()


def test_a_body_that_does_not_arrive_in_time_is_408(server):
    sock = raw_socket(server)
    body = json.dumps(CHAT).encode()
    sock.sendall(http_request("/v1/chat/completions", body)[:-10])  # headers and most of the body
    t0 = time.monotonic()
    raw = read_all(sock)
    sock.close()
    assert raw.startswith(b"HTTP/1.1 408") and b"did not arrive within 2 s" in raw, raw[:300]
    assert time.monotonic() - t0 < 10


def test_a_stream_nobody_reads_is_dropped_and_its_slot_freed(server):
    """A client that stops reading used to keep its generation slot for as long as it liked."""
    before = server.metrics()
    body = {"model": "tiny", "prompt": "Tell me a story.", "max_tokens": 12000, "ignore_eos": True, "stream": True}
    sock = raw_socket(server, rcvbuf=2048)
    sock.sendall(http_request("/v1/completions", json.dumps(body).encode()))  # and never reads
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and server.metrics()["promptcache_requests_cancelled_total"] == \
            before["promptcache_requests_cancelled_total"]:
        time.sleep(0.2)
    after = server.metrics()
    assert after["promptcache_requests_cancelled_total"] == before["promptcache_requests_cancelled_total"] + 1
    assert after["promptcache_completion_tokens_total"] == before["promptcache_completion_tokens_total"]
    assert server.request("POST", "/v1/chat/completions", CHAT).status == 200  # the one slot is free again
    sock.close()


BAD_JSON = [  # (id, body, words in the message)
    ("deeply-nested", b"[" * 100_000 + b"]" * 100_000, "nested more than 64"),
    ("nested-100", b'{"model": "tiny", "x": ' + b"[" * 100 + b"]" * 100 + b"}", "nested more than 64"),
    ("huge-integer-unknown-field", b'{"model": "tiny", "whatever": ' + b"9" * 5000 + b"}", "5000 digits"),
    ("huge-integer-max-tokens", b'{"model": "tiny", "max_tokens": -' + b"9" * 4301 + b"}", "4301 digits"),
    ("nan", b'{"model": "tiny", "temperature": NaN}', "NaN"),
    ("truncated", b'{"model": "tiny", "messages": [', "not valid JSON"),
    ("not-utf8", b'{"model": "\xff\xfe"}', "not UTF-8"),
]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages", "/model/tiny/converse"])
@pytest.mark.parametrize("body, words", [b[1:] for b in BAD_JSON], ids=[b[0] for b in BAD_JSON])
def test_malformed_json_is_400_naming_the_problem(server, path, body, words):
    resp = server.request("POST", path, body)
    assert resp.status == 400, resp.body[:300]
    assert words.encode() in resp.body and b"Traceback" not in resp.body


def test_a_chunked_body_over_the_limit_is_413(server):
    sock = raw_socket(server)
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()
    chunk = b"x" * 65536
    sock.sendall(head)
    try:
        for _ in range(16 * 20):  # 20 MiB > the default 16 MiB
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    except OSError:
        pass  # the server answered and closed
    raw = read_all(sock)
    sock.close()
    assert raw.startswith(b"HTTP/1.1 413"), raw[:200]


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_half_close_is_not_a_disconnect(server, stream):
    """A client that shuts down its sending side after the request used to get 0 bytes."""
    sock = raw_socket(server)
    body = {**CHAT, "max_tokens": 8, "stream": stream}
    sock.sendall(http_request("/v1/chat/completions", json.dumps(body).encode(), extra="Connection: close\r\n"))
    sock.shutdown(socket.SHUT_WR)
    raw = read_all(sock)
    sock.close()
    final = raw[raw.rindex(b"HTTP/1.1 "):]  # interim 100 Continue probes may come first
    assert final.startswith(b"HTTP/1.1 200"), raw[:300]
    assert (b"data: [DONE]" in final) if stream else (b'"completion_tokens":' in final)


WRONG_SHAPES = [[], "x", 5, None, True, {"model": {"a": 1}}, {"model": "tiny", "messages": {}},
                {"model": "tiny", "messages": [None]}, {"model": "tiny", "messages": [{"role": 5, "content": "x"}]},
                {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
                {"model": "tiny", "messages": [{"role": "user", "content": [{"text": 5}]}], "max_tokens": 1},
                {"model": "tiny", "prompt": {"a": []}}, {"model": "tiny", "max_tokens": 1e400},
                {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1, "stop": [5]},
                {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1,
                 "system": [{"type": "text", "text": "s", "cache_control": {"type": "forever"}}]},
                {"messages": [{"role": "user", "content": [{"cachePoint": {"type": "default"}, "text": "x"}]}]},
                {"messages": [{"role": "user", "content": [{"text": "a"}]}], "inferenceConfig": {"maxTokens": -1}}]
PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/messages/count_tokens",
         "/model/tiny/converse", "/model/tiny/converse-stream", "/v1/schemas"]


@pytest.mark.parametrize("path", PATHS)
def test_no_body_of_any_shape_is_a_500(server, path):
    for body in WRONG_SHAPES:
        resp = server.request("POST", path, json.dumps(body) if body is not None else b"null")
        assert resp.status < 500, (path, body, resp.status, resp.body[:300])  # some shapes are valid elsewhere
        assert resp.headers["Content-Type"].startswith(("application/json", "application/vnd.amazon.eventstream"))


def test_health_says_only_alive_without_the_key(server):
    assert server.request("GET", "/health", key=None).json() == {"status": "ok"}
    assert server.request("GET", "/health", key="wrong").json() == {"status": "ok"}
    details = server.request("GET", "/health").json()
    assert details["model"] == "tiny" and details["requests"]["parallel"] == 1


def test_openapi_docs_list_every_api(server):
    assert server.request("GET", "/docs", key=None).status == 200
    paths = server.request("GET", "/openapi.json", key=None).json()["paths"]
    for path in ("/v1/chat/completions", "/v1/messages", "/model/{model_id}/converse-stream", "/v1/schemas"):
        assert path in paths


def test_loading_answers_503_then_serves(tmp_path):
    srv = start_server("--model", "tiny", wait_ready=False)
    try:
        health = srv.request("GET", "/health", key=None)
        assert health.status == 503 and health.json()["status"] == "loading" and health.json()["progress"]
        refused = srv.request("POST", "/v1/chat/completions", CHAT)
        assert refused.status == 503 and refused.json()["error"]["code"] == "loading"
        assert refused.headers["Retry-After"] == "2"
        deadline = time.monotonic() + 300
        while srv.request("GET", "/health", key=None).status != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert srv.request("POST", "/v1/chat/completions", CHAT).status == 200
    finally:
        assert srv.stop() == 0


def test_serve_with_a_missing_schema_path_fails_before_loading_the_model():
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "promptcache", "serve", "--model", "tiny", "--port", "0",
                          "--schemas", "nope/"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "nope" in out.stderr and "no such file or directory" in out.stderr
    assert "serving" not in out.stdout and "loading the model" not in out.stderr
    assert time.monotonic() - t0 < 60


def test_a_queued_request_whose_client_leaves_leaves_the_queue(server):
    body = {"model": "tiny", "prompt": "Tell me a story.", "max_tokens": 3000, "ignore_eos": True, "stream": True}
    runner = server.connection()
    runner.request("POST", "/v1/completions", json.dumps(body), {"Authorization": f"Bearer {KEY}"})
    resp = runner.getresponse()
    assert resp.status == 200 and resp.read(64)  # it holds the one run slot
    queued = raw_socket(server)
    queued.sendall(http_request("/v1/chat/completions", json.dumps(CHAT).encode()))

    def health():
        return server.request("GET", "/health").json()["requests"]

    deadline = time.monotonic() + 30
    while health()["queued"] != 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert health()["queued"] == 1
    queued.close()
    while health()["queued"] != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert health() == {**health(), "queued": 0, "running": 1}  # gone from the queue; the stream still runs
    runner.close()
