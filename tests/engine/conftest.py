"""Shared fixtures: one tiny model per architecture, engines built on it."""

from __future__ import annotations

import functools

import pytest

import promptcache as pc

ARCHS = ("llama", "falcon", "mpt", "mistral", "qwen2", "gemma3")  # the three, two more RoPE families, and
# Gemma 3 (local layers with an 8-position window, a global layer)


@functools.cache
def tiny(arch: str):
    return pc.testing.tiny_model(arch, seed=0)


def make_engine(arch: str, **kw) -> pc.Engine:
    model, tok = tiny(arch)
    return pc.Engine(model, tok, progress=False, **kw)


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture
def engine(arch) -> pc.Engine:
    return make_engine(arch)


DOCS = """
<schema name="docs">
  You answer questions about the documents below.
  <module name="intro">The first document talks about the city, its hotel and a long trip.</module>
  <module name="code"><![CDATA[def f(x): return x < 3 and x > 1 & 2]]></module>
  <module name="notes">The last document lists what people said about water, air and the earth.</module>
</schema>
"""

ALL_DOCS_PROMPT = '<prompt schema="docs"><intro/><code/><notes/>What is the answer?</prompt>'
