"""benchmarks/peer.py's pieces (the run itself needs llama-cpp-python and minutes: see benchmarks/README.md)."""

from __future__ import annotations

import pytest

import promptcache as pc
from benchmarks import peer


@pytest.fixture(scope="module")
def tok():
    return pc.testing.tiny_tokenizer()


@pytest.mark.parametrize("n", [150, 20000])
def test_documents_are_whole_source_lines_up_to_the_size(tok, n):
    doc = peer.document(tok, n)
    size = len(tok(doc, add_special_tokens=False).input_ids)
    assert 0.9 * n <= size <= n
    lines = {line for f in peer.SOURCES.glob("*.py") for line in f.read_text().splitlines()}
    assert all(line in lines or line.startswith("# ---- inventory/") for line in doc.splitlines())
    assert ("(copy 2)" in doc) == (n > 150)  # the package is repeated only when it is too short


def test_questions_are_distinct():
    qs = peer.questions(40)
    assert len(set(qs)) == 40


def test_the_document_as_a_module_keeps_its_text(tok):
    engine = pc.Engine(*pc.testing.tiny_model("llama", seed=0), progress=False)
    doc = peer.document(tok, 150) + "\nif a < b & c: pass"
    schema, prompt = peer.pml("doc_test", doc, "\n\nWhat is x < y & z?")
    engine.add_schema(schema)
    text = tok.decode(engine.plan(prompt).token_ids)
    assert doc in text and "What is x < y & z?" in text


def test_verdicts_are_per_dtype_and_need_every_context():
    good = {"prefix_ratio": 0.9, "module_ratio": 0.5, "decode_ratio": 0.7, "prefill_speedup": 2.0}
    rows = [{"dtype": "float32", **good}, {"dtype": "float32", **good, "prefix_ratio": 1.1},
            {"dtype": "bfloat16", **good}, {"dtype": "bfloat16", **good, "decode_ratio": 0.5}]
    met = peer.verdicts(rows)
    assert met["float32"] == {"prefix_ratio": False, "module_ratio": True, "decode_ratio": True,
                              "prefill_speedup": True}
    assert met["bfloat16"] == {"prefix_ratio": True, "module_ratio": True, "decode_ratio": False,
                               "prefill_speedup": True}


def test_engine_entries_name_a_dtype_and_options(monkeypatch):
    made = {}

    class FakeEngine:
        @classmethod
        def from_pretrained(cls, path, **kw):
            made.update(kw)
            return cls()

    peer.engine_for(FakeEngine, "x.gguf", "bfloat16+int8")
    assert made["dtype"] == "bfloat16" and made["int8_decode"] and not made["compile_decode"]
    with pytest.raises(SystemExit, match="unknown option"):
        peer.engine_for(FakeEngine, "x.gguf", "bfloat16+int4")
