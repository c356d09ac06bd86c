"""POST /v1/schemas past `--module-budget-bytes` is refused by name (issue 27, finding "any caller can grow
the module store without bound"); the schemas added before keep serving."""

from __future__ import annotations

from .conftest import start_server

SCHEMA = '<schema name="{name}"><module name="doc">{text}</module></schema>'
XML = {"Content-Type": "application/xml"}


def test_a_schema_past_the_module_budget_is_refused_and_the_others_keep_serving():
    text = "The document talks about the city, its hotel and a long trip by the sea. " * 20  # 451,584 bytes
    server = start_server("--model", "tiny", "--module-budget-bytes", "600000")
    try:
        assert server.request("POST", "/v1/schemas", SCHEMA.format(name="a", text=text), headers=XML).status == 200
        refused = server.request("POST", "/v1/schemas", SCHEMA.format(name="b", text=text), headers=XML)
        assert refused.status == 400 and "module_budget_bytes=600,000" in refused.body.decode()
        assert [s["id"] for s in server.request("GET", "/v1/schemas").json()["data"]] == ["a"]
        answer = server.request("POST", "/v1/completions", {
            "model": server.model, "prompt": '<prompt schema="a"><doc/>Where?</prompt>', "max_tokens": 2})
        assert answer.status == 200, answer.body
    finally:
        assert server.stop() == 0
