"""Encoding work is bounded by the input: union members run in bounded batches."""

from __future__ import annotations

import torch

from promptcache.engine import encode

from .conftest import make_engine

PREFIX = " ".join(["The city has a hotel by the water and a long history."] * 40)


def _union_schema(members: int) -> str:
    body = "".join(f'<module name="m{i}">{i}</module>' for i in range(members))
    return f'<schema name="u"><module name="doc">{PREFIX}</module><union>{body}</union></schema>'


def _record_cache_sizes(monkeypatch) -> list[int]:
    sizes: list[int] = []
    real = encode.request_cache

    def recording(parts, capacity, **kw):
        sizes.append(kw.get("batch", 1) * capacity)
        return real(parts, capacity, **kw)

    monkeypatch.setattr(encode, "request_cache", recording)
    return sizes


def test_union_members_run_in_bounded_batches(monkeypatch):
    engine = make_engine("llama")
    sizes = _record_cache_sizes(monkeypatch)
    layout = engine.add_schema(_union_schema(120))
    prefix = layout.module("doc").end
    assert prefix > 300
    # one batch of all members would hold 120 copies of the prefix
    assert max(sizes[1:]) <= max(encode.BATCH_TOKENS, prefix + 8) < 120 * prefix


def test_batching_never_changes_states(arch, monkeypatch):
    schema = _union_schema(12)
    whole = make_engine(arch)
    whole.add_schema(schema)
    monkeypatch.setattr(encode, "BATCH_TOKENS", 1)  # one member per batch
    single = make_engine(arch)
    single.add_schema(schema)
    for i in range(12):
        a, b = whole.module_states("u", f"m{i}"), single.module_states("u", f"m{i}")
        for ka, kb in zip(a.keys, b.keys):
            torch.testing.assert_close(ka, kb, rtol=1e-5, atol=1e-5)
