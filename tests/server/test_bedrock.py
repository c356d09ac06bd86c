"""Bedrock's Converse API through boto3's bedrock-runtime client pointed at the server (dummy credentials):
`converse`, `converse_stream` (AWS's binary event-stream framing, parsed by botocore), `cachePoint`
blocks and their usage, errors as botocore's ClientErrors."""

from __future__ import annotations

import uuid

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from promptcache.engine.engine import Engine

from .conftest import served, start_server

SYSTEM = "You are a weather assistant who answers in a long and careful way. " * 8
QUESTION = "Will it rain tomorrow?"


@pytest.fixture(scope="module")
def server():
    yield from served("--model", "tiny")


def runtime(server, **env):
    config = Config(retries={"max_attempts": 1}, read_timeout=120)
    return boto3.client("bedrock-runtime", endpoint_url=f"http://{server.host}:{server.port}", region_name="us-east-1",
                        aws_access_key_id="dummy", aws_secret_access_key="dummy", config=config)


@pytest.fixture(scope="module")
def client(server):
    return runtime(server)


@pytest.fixture(scope="module")
def oracle():
    return Engine.from_pretrained("tiny", device="cpu", progress=False)


def converse(client, text=QUESTION, system=None, salt=None, cache_system=False, **config):
    system_blocks = [{"text": system or SYSTEM}] + ([{"cachePoint": {"type": "default"}}] if cache_system else [])
    return client.converse(modelId="tiny", system=system_blocks,
                           messages=[{"role": "user", "content": [{"text": text}]}],
                           inferenceConfig={"maxTokens": 8, "temperature": 0, **config},
                           additionalModelRequestFields={"cache_salt": salt or uuid.uuid4().hex})


def test_converse_answers_what_the_library_answers(client, oracle):
    out = converse(client)
    want = oracle.generate([{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}],
                           max_new_tokens=8, enable_cache=False)
    assert out["output"]["message"]["content"][0]["text"] == want.text
    assert out["stopReason"] == {"length": "max_tokens", "stop": "end_turn"}[want.finish_reason]
    u = out["usage"]
    assert u["outputTokens"] == want.usage.output_tokens
    assert u["inputTokens"] + u["cacheReadInputTokens"] + u["cacheWriteInputTokens"] == want.usage.input_tokens
    assert u["totalTokens"] == want.usage.input_tokens + want.usage.output_tokens


def test_cache_point_after_the_system_prompt_writes_then_reads(client):
    salt = uuid.uuid4().hex
    first = converse(client, salt=salt, cache_system=True)["usage"]
    assert first["cacheWriteInputTokens"] > 100 and first["cacheReadInputTokens"] == 0
    second = converse(client, text="And the day after?", salt=salt, cache_system=True)["usage"]
    assert second["cacheReadInputTokens"] >= first["cacheWriteInputTokens"] and second["cacheWriteInputTokens"] == 0


def test_converse_stream_is_parsed_by_boto3_and_equals_converse(client):
    plain = converse(client)
    stream = client.converse_stream(modelId="tiny", system=[{"text": SYSTEM}],
                                    messages=[{"role": "user", "content": [{"text": QUESTION}]}],
                                    inferenceConfig={"maxTokens": 8, "temperature": 0},
                                    additionalModelRequestFields={"cache_salt": uuid.uuid4().hex})["stream"]
    events = list(stream)
    kinds = [next(iter(e)) for e in events]
    assert kinds[0] == "messageStart" and kinds[-3:] == ["contentBlockStop", "messageStop", "metadata"]
    assert set(kinds[1:-3]) == {"contentBlockDelta"}
    text = "".join(e["contentBlockDelta"]["delta"]["text"] for e in events if "contentBlockDelta" in e)
    assert text == plain["output"]["message"]["content"][0]["text"]
    assert events[-2]["messageStop"]["stopReason"] == plain["stopReason"]
    usage = events[-1]["metadata"]["usage"]
    assert usage["outputTokens"] == plain["usage"]["outputTokens"]
    assert usage["totalTokens"] == plain["usage"]["totalTokens"]


def test_errors_are_client_errors_with_aws_codes(client):
    with pytest.raises(ClientError) as e:
        client.converse(modelId="nope", messages=[{"role": "user", "content": [{"text": "x"}]}])
    assert e.value.response["Error"]["Code"] == "ResourceNotFoundException"
    assert "'nope' does not exist" in e.value.response["Error"]["Message"]
    with pytest.raises(ClientError) as e:
        converse(client, temperature=1.5)
    assert e.value.response["Error"]["Code"] == "ValidationException"
    assert "temperature" in e.value.response["Error"]["Message"]


def test_a_server_with_a_key_wants_it_as_a_bearer_token():
    """boto3 sends AWS_BEARER_TOKEN_BEDROCK only over HTTPS (a TLS proxy in front); SigV4 is refused."""
    srv = start_server("--model", "tiny", key="bedrock-key")
    try:
        with pytest.raises(ClientError) as e:
            converse(runtime(srv))
        assert e.value.response["Error"]["Code"] == "AccessDeniedException"
        body = {"messages": [{"role": "user", "content": [{"text": "hi"}]}], "inferenceConfig": {"maxTokens": 2}}
        assert srv.request("POST", "/model/tiny/converse", body, key="bedrock-key").status == 200
    finally:
        assert srv.stop() == 0


def test_the_conversation_example_prints_its_table_and_chart(server):
    import subprocess
    import sys

    from .conftest import ROOT

    out = subprocess.run([sys.executable, "examples/converse_cache.py", "--url", f"http://{server.host}:{server.port}",
                          "--model", "tiny", "--max-tokens", "4", "--turns", "3"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = out.stdout.split("latency ms")[1].split("\n\n")[0].strip().splitlines()[1:]
    turns = [[int(float(x)) for x in row.split()] for row in rows]
    assert [t[0] for t in turns] == [1, 2, 3]
    assert turns[0][3] > 100 and turns[0][2] == 0  # turn 1 writes the system prompt and its question
    assert all(t[2] > 100 for t in turns[1:])  # later turns read it
    assert "R cache read" in out.stdout and out.stdout.count("|") == 3
