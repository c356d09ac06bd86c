"""`POST /v1/messages` through the official `anthropic` client, and prompt caching as Anthropic documents
it: `cache_control` breakpoints on system and message blocks (and the top-level form), their TTLs, and
usage that sums to the prompt's tokens. The oracle is the library (the same seeded tiny model)."""

from __future__ import annotations

import uuid

import anthropic
import pytest

from promptcache.engine.engine import Engine

from .conftest import served

KEY = "anthropic-test-key"
SYSTEM = "You are a weather assistant who answers in a long and careful way. " * 8
QUESTION = [{"role": "user", "content": "Will it rain tomorrow?"}]


@pytest.fixture(scope="module")
def server():
    yield from served("--model", "tiny", key=KEY)


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=f"http://{server.host}:{server.port}", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def oracle():
    return Engine.from_pretrained("tiny", device="cpu", progress=False)


def ask(client, messages=QUESTION, system=SYSTEM, **kwargs):
    extra = {"temperature": 0, "cache_salt": uuid.uuid4().hex, **kwargs.pop("extra_body", {})}
    return client.messages.create(model="tiny", max_tokens=kwargs.pop("max_tokens", 8), system=system,
                                  messages=messages, extra_body=extra, **kwargs)


def total(usage) -> int:
    return usage.input_tokens + usage.cache_creation_input_tokens + usage.cache_read_input_tokens


def cached_system(ttl: str | None = None) -> list[dict]:
    control = {"type": "ephemeral"} if ttl is None else {"type": "ephemeral", "ttl": ttl}
    return [{"type": "text", "text": SYSTEM, "cache_control": control}]


def test_a_message_answers_what_the_library_answers(client, oracle):
    out = ask(client)
    chat = [{"role": "system", "content": SYSTEM}, *QUESTION]
    want = oracle.generate(chat, max_new_tokens=8, enable_cache=False)
    assert out.type == "message" and out.role == "assistant" and out.content[0].type == "text"
    assert out.content[0].text == want.text
    assert out.stop_reason == {"length": "max_tokens", "stop": "end_turn"}[want.finish_reason]
    assert out.usage.output_tokens == want.usage.output_tokens
    assert total(out.usage) == want.usage.input_tokens
    assert out.usage.cache_creation_input_tokens == out.usage.cache_read_input_tokens == 0


def test_sampling_fields_arrive_as_body_fields(client, oracle):
    """The 2.x client sends temperature/top_p/top_k through extra_body; top_k=1 at temperature 1 is greedy."""
    chat = [{"role": "system", "content": SYSTEM}, *QUESTION]
    greedy = oracle.generate(chat, max_new_tokens=12, ignore_eos=True).text
    out = ask(client, max_tokens=12, extra_body={"temperature": 1.0, "top_k": 1, "top_p": 0.9, "ignore_eos": True})
    assert out.content[0].text == greedy
    with pytest.raises(anthropic.BadRequestError, match="temperature"):
        ask(client, extra_body={"temperature": 1.5})


def test_stop_sequences(client, oracle):
    chat = [{"role": "system", "content": SYSTEM}, *QUESTION]
    full = oracle.generate(chat, max_new_tokens=12, ignore_eos=True).text
    stop = full[4:6]
    out = ask(client, max_tokens=12, stop_sequences=[stop], extra_body={"ignore_eos": True})
    assert out.content[0].text == full[: full.find(stop)]
    assert (out.stop_reason, out.stop_sequence) == ("stop_sequence", stop)
    with client.messages.stream(model="tiny", max_tokens=12, system=SYSTEM, messages=QUESTION, stop_sequences=[stop],
                                extra_body={"temperature": 0, "ignore_eos": True}) as stream:
        final = stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", stop)
    unstopped = ask(client, max_tokens=12, extra_body={"ignore_eos": True})
    assert (unstopped.stop_reason, unstopped.stop_sequence) == ("max_tokens", None)


def test_stream_is_anthropics_event_sequence_and_equals_the_message(client):
    salt = uuid.uuid4().hex
    plain = ask(client, max_tokens=10, extra_body={"cache_salt": salt + "-a"})
    with client.messages.stream(model="tiny", max_tokens=10, system=SYSTEM, messages=QUESTION,
                                extra_body={"temperature": 0, "cache_salt": salt + "-b"}) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert final.content[0].text == plain.content[0].text
    assert final.stop_reason == plain.stop_reason and final.usage.output_tokens == plain.usage.output_tokens
    assert total(final.usage) == total(plain.usage)


def test_stream_wire_events_in_order(server):
    body = {"model": "tiny", "max_tokens": 5, "system": SYSTEM, "messages": QUESTION, "stream": True,
            "temperature": 0, "ignore_eos": True, "cache_salt": uuid.uuid4().hex}
    resp = server.request("POST", "/v1/messages", body)
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    names = [e.split("\n")[0].removeprefix("event: ") for e in resp.body.decode().split("\n\n") if e]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}  # a token may add no text (a partial character)


def test_system_breakpoint_writes_then_reads_and_usage_sums(client):
    salt = uuid.uuid4().hex
    first = ask(client, system=cached_system(), extra_body={"cache_salt": salt})
    u = first.usage
    assert u.cache_read_input_tokens == 0 and u.cache_creation_input_tokens > 100
    assert u.cache_creation.ephemeral_5m_input_tokens == u.cache_creation_input_tokens
    assert u.cache_creation.ephemeral_1h_input_tokens == 0
    assert u.input_tokens > 0  # the question after the breakpoint
    other = [{"role": "user", "content": "And the day after?"}]
    second = ask(client, messages=other, system=cached_system(), extra_body={"cache_salt": salt})
    v = second.usage
    assert v.cache_read_input_tokens >= u.cache_creation_input_tokens and v.cache_creation_input_tokens == 0
    assert total(v) == second_total(client, other, salt)


def second_total(client, messages, salt) -> int:
    return client.messages.count_tokens(model="tiny", system=SYSTEM, messages=messages,
                                        extra_body={"cache_salt": salt}).input_tokens


def test_two_breakpoints_split_the_writes_by_ttl(client):
    salt = uuid.uuid4().hex
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "Here is a long document about clouds. " * 10, "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": " What does it say?"}]}]
    out = ask(client, messages=messages, system=cached_system("1h"), extra_body={"cache_salt": salt})
    c = out.usage.cache_creation
    assert c.ephemeral_1h_input_tokens > 100 and c.ephemeral_5m_input_tokens > 50
    assert out.usage.cache_creation_input_tokens == c.ephemeral_1h_input_tokens + c.ephemeral_5m_input_tokens
    assert total(out.usage) == client.messages.count_tokens(model="tiny", system=SYSTEM, messages=[
        {"role": "user", "content": "Here is a long document about clouds. " * 10 + " What does it say?"}],
        extra_body={"cache_salt": salt}).input_tokens


def test_top_level_cache_control_keeps_the_whole_conversation(client, server):
    salt = uuid.uuid4().hex
    out = ask(client, extra_body={"cache_salt": salt, "cache_control": {"type": "ephemeral"}})
    assert out.usage.cache_creation_input_tokens > 100 and out.usage.input_tokens <= 3  # the generation prompt
    again = ask(client, extra_body={"cache_salt": salt})
    assert again.usage.cache_read_input_tokens == total(again.usage) - 1  # all but the last token


def test_requests_without_breakpoints_report_automatic_reuse_as_reads(client):
    salt = uuid.uuid4().hex
    ask(client, extra_body={"cache_salt": salt})
    again = ask(client, messages=[{"role": "user", "content": "Any snow?"}], extra_body={"cache_salt": salt})
    assert again.usage.cache_read_input_tokens > 100 and again.usage.cache_creation_input_tokens == 0


def test_errors_come_in_anthropics_envelope(client, server):
    with pytest.raises(anthropic.BadRequestError, match="at most 4 cache breakpoints"):
        blocks = [{"type": "text", "text": f"part {i}. ", "cache_control": {"type": "ephemeral"}} for i in range(5)]
        ask(client, system=blocks)
    with pytest.raises(anthropic.NotFoundError, match="does not exist"):
        client.messages.create(model="claude-9", max_tokens=4, messages=QUESTION)
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=f"http://{server.host}:{server.port}", api_key="wrong",
                            max_retries=0).messages.create(model="tiny", max_tokens=4, messages=QUESTION)
    resp = server.request("POST", "/v1/messages", {"model": "tiny", "messages": QUESTION})
    assert resp.status == 400
    assert resp.json() == {"type": "error", "error": {"type": "invalid_request_error",
                                                      "message": "max_tokens: is required"}}
    bad = {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "image"}]}]}
    assert server.request("POST", "/v1/messages", bad).status == 400


def test_openai_chat_honours_cache_control_on_content_parts(server):
    salt = uuid.uuid4().hex
    parts = [{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}]
    body = {"model": "tiny", "max_tokens": 2, "temperature": 0, "cache_salt": salt,
            "messages": [{"role": "system", "content": parts}, *QUESTION]}
    first = server.request("POST", "/v1/chat/completions", body).json()["usage"]
    assert first["promptcache"]["kept_tokens"] > 100
    second = server.request("POST", "/v1/chat/completions", {**body, "messages": [
        {"role": "system", "content": parts}, {"role": "user", "content": "Snow?"}]}).json()["usage"]
    assert second["prompt_tokens_details"]["cached_tokens"] >= first["promptcache"]["kept_tokens"]
    assert second["promptcache"]["kept_tokens"] == 0
