"""`promptcache serve` over the tiny model, through the official openai client and raw HTTP.

The oracle is the library itself: the same seeded tiny model loaded in this process answers every
greedy request with the text the server must send back. Each test uses its own `cache_salt` where
cached prefixes of other tests could change what it sees.
"""

from __future__ import annotations

import json
import re
import uuid
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from promptcache.engine.engine import Engine

from .conftest import ROOT, served

KEY = "test-key-" + uuid.uuid4().hex
MAX_BODY = 128 * 1024
PERSONA = (ROOT / "schemas" / "persona.xml").read_text()
PML = ('<prompt schema="persona"><age-60s/><occupation-farmer/><personality-grumpy/>'
       "<user>What do you think about smartphones?</user></prompt>")


@pytest.fixture(scope="module")
def server():
    yield from served("--model", "tiny", "--parallel", "2", "--max-queue", "16",
                       "--max-body-bytes", str(MAX_BODY), key=KEY)


@pytest.fixture(scope="module")
def oracle():
    return Engine.from_pretrained("tiny", device="cpu", progress=False)


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def salt() -> str:
    return uuid.uuid4().hex


def chat(client, messages, **kwargs):
    kwargs.setdefault("temperature", 0)
    extra = {"cache_salt": kwargs.pop("cache_salt", salt()), **kwargs.pop("extra_body", {})}
    return client.chat.completions.create(model="tiny", messages=messages, extra_body=extra, **kwargs)


MESSAGES = [{"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "Name three colours."}]


def test_models_lists_the_served_model(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert server.request("GET", "/v1/models/tiny").json()["id"] == "tiny"


def test_chat_answers_what_the_library_answers(client, oracle):
    out = chat(client, MESSAGES, max_tokens=12)
    want = oracle.generate(MESSAGES, max_new_tokens=12, enable_cache=False)
    choice = out.choices[0]
    assert out.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.message.content == want.text
    assert choice.finish_reason == want.finish_reason
    u = out.usage
    assert (u.prompt_tokens, u.completion_tokens) == (want.usage.input_tokens, want.usage.output_tokens)
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.prompt_tokens_details.cached_tokens == 0
    extra = u.model_extra["promptcache"]
    assert extra["cache_write_tokens"] == u.prompt_tokens and extra["ttft_s"] > 0


def test_max_completion_tokens_stop_and_seed_reach_the_engine(client, oracle):
    out = chat(client, MESSAGES, max_completion_tokens=3, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 3 and out.choices[0].finish_reason == "length"
    full = oracle.generate(MESSAGES, max_new_tokens=12, ignore_eos=True).text
    stop = full[4:6]
    cut = chat(client, MESSAGES, max_tokens=12, stop=[stop], extra_body={"ignore_eos": True}).choices[0]
    assert (cut.message.content, cut.finish_reason) == (full[: full.find(stop)], "stop")
    sampled = [chat(client, MESSAGES, max_tokens=8, temperature=1.0, seed=7).choices[0].message.content
               for _ in range(2)]
    want = oracle.generate(MESSAGES, max_new_tokens=8, temperature=1.0, seed=7).text
    assert sampled == [want, want]


def test_stream_equals_non_stream(client):
    plain = chat(client, MESSAGES, max_tokens=16)
    chunks = list(chat(client, MESSAGES, max_tokens=16, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:-1])
    finals = [c.choices[0].finish_reason for c in chunks[:-1]]
    assert finals[-1] == plain.choices[0].finish_reason and not any(finals[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert text == plain.choices[0].message.content


def test_stream_wire_format_is_sse_ending_with_done(server):
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0, "stream": True}
    resp = server.request("POST", "/v1/completions", body)
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    events = resp.body.decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    parsed = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-2])
    assert {p["object"] for p in parsed} == {"text_completion"} and parsed[-1]["choices"][0]["finish_reason"]
    plain = server.request("POST", "/v1/completions", {**body, "stream": False}).json()
    assert "".join(p["choices"][0]["text"] for p in parsed) == plain["choices"][0]["text"]


def test_completions_with_pml_after_posting_a_schema(server, client, oracle):
    posted = server.request("POST", "/v1/schemas", PERSONA, headers={"Content-Type": "application/xml"})
    assert posted.status == 200, posted.body
    layout = oracle.add_schema(PERSONA)
    modules = {m["name"]: m for m in posted.json()["modules"]}
    assert modules.keys() == layout.modules.keys()
    assert modules["age-60s"]["tokens"] == len(layout.modules["age-60s"].token_ids) > 0
    assert server.request("GET", "/v1/schemas/persona").json() == posted.json()
    assert [s["id"] for s in server.request("GET", "/v1/schemas").json()["data"]] == ["persona"]

    out = client.completions.create(model="tiny", prompt=PML, max_tokens=8, temperature=0)
    want = oracle.generate(PML, max_new_tokens=8)
    assert out.choices[0].text == want.text
    extra = out.usage.model_extra["promptcache"]
    assert {"age-60s", "occupation-farmer", "personality-grumpy"} <= set(extra["modules_hit"])
    assert out.usage.prompt_tokens_details.cached_tokens == want.usage.cached_tokens > 0

    assert server.request("DELETE", "/v1/schemas/persona").json()["deleted"] is True
    assert server.request("GET", "/v1/schemas/persona").status == 404
    with pytest.raises(openai.BadRequestError, match="unknown schema 'persona'"):
        client.completions.create(model="tiny", prompt=PML, max_tokens=2)


DOCS = """<schema name="docs-rc">
  <system>You answer from the documents.</system>
  <module name="a">The first document talks about the city, its hotel and a long trip by the sea.</module>
  <module name="b">The second document lists what people said about water, air and the earth.</module>
  <module name="c">The last document is about a garden with roses, a pond and an old stone wall.</module>
</schema>"""
SKIPPING = '<prompt schema="docs-rc"><a/><c/><user>What is it about?</user></prompt>'  # c was encoded after b


def test_recompute_per_request_reaches_the_engine_and_usage_reports_it(server, client, oracle):
    assert server.request("POST", "/v1/schemas", DOCS).status == 200
    oracle.add_schema(DOCS)
    # 1.0 before 0.5: a prefill with nothing stale left is kept, and the next 1.0 request of the text reads it
    for recompute in (None, 1.0, 0.5):
        extra = {} if recompute is None else {"recompute": recompute}
        out = client.completions.create(model="tiny", prompt=SKIPPING, max_tokens=8, temperature=0, extra_body=extra)
        want = oracle.generate(SKIPPING, max_new_tokens=8, recompute=recompute)
        assert out.choices[0].text == want.text
        assert out.usage.model_extra["promptcache"]["recomputed_tokens"] == want.usage.recomputed_tokens
        assert (want.usage.recomputed_tokens > 0) == (recompute is not None)
        if recompute == 1.0:
            assert want.text == oracle.generate(SKIPPING, max_new_tokens=8, enable_cache=False).text


def test_repeated_prefix_reports_cached_tokens_and_metrics_count_them(server, client):
    tenant = salt()
    system = {"role": "system", "content": "You answer questions about the weather. " * 20}
    before = server.metrics()
    first = chat(client, [system, {"role": "user", "content": "Rain?"}], max_tokens=2, cache_salt=tenant)
    second = chat(client, [system, {"role": "user", "content": "Snow?"}], max_tokens=2, cache_salt=tenant)
    after = server.metrics()
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 100 < cached < second.usage.prompt_tokens
    assert after["promptcache_cached_tokens_total"] - before["promptcache_cached_tokens_total"] == cached
    assert after["promptcache_prompt_tokens_total"] - before["promptcache_prompt_tokens_total"] == \
        first.usage.prompt_tokens + second.usage.prompt_tokens
    chats = 'promptcache_requests_total{endpoint="/v1/chat/completions",status="200"}'
    assert after[chats] - before.get(chats, 0) == 2
    assert after["promptcache_ttft_seconds_count"] - before["promptcache_ttft_seconds_count"] == 2
    assert after["promptcache_prefix_cache_bytes"] > 0


def test_cache_salt_isolates_tenants(client):
    messages = [{"role": "system", "content": "Shared instructions for every tenant. " * 10},
                {"role": "user", "content": "Hello"}]
    a, b = salt(), salt()
    chat(client, messages, max_tokens=2, cache_salt=a)
    assert chat(client, messages, max_tokens=2, cache_salt=a).usage.prompt_tokens_details.cached_tokens > 0
    assert chat(client, messages, max_tokens=2, cache_salt=b).usage.prompt_tokens_details.cached_tokens == 0


def test_eight_concurrent_clients_get_the_serial_answers(client):
    prompts = [[{"role": "user", "content": f"Question number {i}: {'why ' * i}?"}] for i in range(8)]
    serial_salt, parallel_salt = salt(), salt()  # neither round reuses the other's prefixes

    def ask(messages, tenant):
        return chat(client, messages, max_tokens=10, cache_salt=tenant).choices[0].message.content

    serial = [ask(p, serial_salt) for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        parallel = list(pool.map(ask, prompts, [parallel_salt] * 8))
    assert parallel == serial and len(set(serial)) > 1


# ---- errors -------------------------------------------------------------------------------

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"model": "tiny", "prompt": "hi", "max_tokens": 2}

ERRORS = [  # (id, path, body, status, param, words in the message)
    ("malformed-json", "/v1/chat/completions", b'{"model": "tiny",', 400, "body", "not valid JSON"),
    ("not-utf8", "/v1/chat/completions", b'{"model": "\xff"}', 400, "body", "UTF-8"),
    ("not-an-object", "/v1/chat/completions", [CHAT], 400, "body", "must be an object"),
    ("model-missing", "/v1/chat/completions", {**CHAT, "model": None}, 400, "model", "required"),
    ("messages-type", "/v1/chat/completions", {**CHAT, "messages": "hi"}, 400, "messages", "array"),
    ("content-type", "/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": 5}]}, 400,
     "messages[0].content", "string"),
    ("role-unknown", "/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400,
     None, "wizard"),
    ("temperature-type", "/v1/chat/completions", {**CHAT, "temperature": "hot"}, 400, "temperature", "number"),
    ("temperature-range", "/v1/chat/completions", {**CHAT, "temperature": 2.5}, 400, "temperature", "<= 2"),
    ("top-p-range", "/v1/chat/completions", {**CHAT, "top_p": 0}, 400, "top_p", "> 0"),
    ("max-tokens-range", "/v1/chat/completions", {**CHAT, "max_tokens": 0}, 400, "max_tokens", ">= 1"),
    ("max-tokens-bool", "/v1/completions", {**COMPLETION, "max_tokens": True}, 400, "max_tokens", "integer"),
    ("max-tokens-fraction", "/v1/completions", {**COMPLETION, "max_tokens": 2.5}, 400, "max_tokens", "integer"),
    ("stream-type", "/v1/chat/completions", {**CHAT, "stream": "yes"}, 400, "stream", "true or false"),
    ("stop-empty", "/v1/chat/completions", {**CHAT, "stop": [""]}, 400, "stop[0]", "at least 1 character"),
    ("n-2", "/v1/chat/completions", {**CHAT, "n": 2}, 400, "n", "n=1"),
    ("top-k-range", "/v1/completions", {**COMPLETION, "top_k": -5}, 400, "top_k", ">= -1"),
    ("penalty-range", "/v1/completions", {**COMPLETION, "repetition_penalty": 0}, 400, "repetition_penalty", "> 0"),
    ("salt-type", "/v1/completions", {**COMPLETION, "cache_salt": 5}, 400, "cache_salt", "string"),
    ("recompute-type", "/v1/completions", {**COMPLETION, "recompute": "all"}, 400, "recompute", "number"),
    ("recompute-range", "/v1/chat/completions", {**CHAT, "recompute": 1.5}, 400, "recompute", "<= 1"),
    ("logprobs", "/v1/chat/completions", {**CHAT, "logprobs": True}, 400, "logprobs", "not returned"),
    ("stream-options-alone", "/v1/chat/completions", {**CHAT, "stream_options": {"include_usage": True}}, 400,
     "stream_options", "stream is true"),
    ("prompt-token-ids", "/v1/completions", {**COMPLETION, "prompt": [1, 2, 3]}, 400, "prompt", "string"),
    ("pml-unknown-schema", "/v1/completions", {**COMPLETION, "prompt": '<prompt schema="nope"><user>x</user></prompt>'},
     400, None, "unknown schema 'nope'"),
    ("pml-malformed", "/v1/completions", {**COMPLETION, "prompt": '<prompt schema="x"><user>x</prompt>'}, 400,
     None, "line 1"),
    ("unknown-model", "/v1/chat/completions", {**CHAT, "model": "gpt-9"}, 404, "model", "'gpt-9' does not exist"),
    ("unknown-path", "/v1/embeddings", CHAT, 404, None, "no endpoint"),
    ("schema-not-xml", "/v1/schemas", "/etc/passwd", 400, "body", "<schema>"),
    ("schema-src-refused", "/v1/schemas", '<schema name="s"><module name="m" src="/etc/passwd"/></schema>', 400,
     None, "--schema-base-dir"),
    ("schema-invalid", "/v1/schemas", '<schema name="s"><modul name="m"/></schema>', 400, None, "modul"),
]


def check_envelope(resp, status: int) -> dict:
    assert resp.status == status, resp.body
    assert b"Traceback" not in resp.body and resp.headers["Content-Type"] == "application/json"
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize("path, body, status, param, words", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_bad_requests_get_an_openai_error_naming_the_culprit(server, path, body, status, param, words):
    error = check_envelope(server.request("POST", path, body), status)
    assert error["param"] == param and words in error["message"], error
    assert server.health()["status"] == "ok"


def test_wrong_method_is_405(server):
    error = check_envelope(server.request("GET", "/v1/chat/completions"), 405)
    assert "POST" in error["message"]


def test_unknown_schema_is_404(server):
    assert check_envelope(server.request("DELETE", "/v1/schemas/nope"), 404)["code"] == "schema_not_found"


@pytest.mark.parametrize("key", [None, "wrong-key", KEY + "x", ""])
def test_missing_or_wrong_key_is_401(server, key):
    resp = server.request("POST", "/v1/chat/completions", CHAT, key=key)
    assert check_envelope(resp, 401)["code"] == "invalid_api_key"
    assert check_envelope(server.request("GET", "/metrics", key=key), 401)
    assert server.request("GET", "/health", key=key).status == 200  # health needs no key


def test_openai_client_with_a_wrong_key_gets_authentication_error(server):
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").chat.completions.create(model="tiny", messages=CHAT["messages"])


def test_body_over_the_limit_is_413_and_the_server_keeps_serving(server, client):
    big = {**COMPLETION, "prompt": "x" * MAX_BODY}
    error = check_envelope(server.request("POST", "/v1/completions", big), 413)
    assert str(MAX_BODY) in error["message"]
    assert chat(client, MESSAGES, max_tokens=1).usage.completion_tokens == 1


def test_prompt_over_the_context_window_is_400_with_both_numbers(server, oracle):
    window = oracle.adapter.max_positions
    prompt = "hello " * (window // 3 + 10)  # 3 tokens a word under the tiny tokenizer
    error = check_envelope(server.request("POST", "/v1/completions", {**COMPLETION, "prompt": prompt}), 400)
    needed = re.search(r"needs (\d+) positions", error["message"])
    assert needed and int(needed.group(1)) > window and f"context window is {window}" in error["message"]
    assert error["code"] == "context_length_exceeded"


def test_malformed_http_gets_the_envelope(server):
    conn = server.connection()
    conn.connect()
    conn.sock.sendall(b"BREW /v1/models HTTP/1.1 junk\r\nHost: x\r\n\r\n")
    raw = b""
    while chunk := conn.sock.recv(65536):  # the server closes the connection after a malformed request
        raw += chunk
    conn.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and json.loads(body)["error"]["message"]



def test_an_unread_body_is_never_taken_for_the_next_request(server):
    """A request refused before its body is read (here: no key) must not leave the body on the
    connection, where a keep-alive server would parse it as a second request (smuggling)."""
    smuggled = f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\r\n".encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(smuggled)}\r\n\r\n").encode()
    conn = server.connection(timeout=10)
    conn.connect()
    conn.sock.sendall(head + smuggled)
    raw = b""
    try:
        while chunk := conn.sock.recv(65536):
            raw += chunk
    except TimeoutError:  # the connection stayed open: a second answer may have come
        pass
    conn.close()
    assert raw.startswith(b"HTTP/1.1 401") and raw.count(b"HTTP/1.1 ") == 1, raw[:300]
