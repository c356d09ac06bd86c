"""LongBench task loading, the shipped samples, and their PML translation."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from benchmarks.longbench import (
    TEMPLATES,
    Example,
    TaskFormatError,
    cdata,
    collect_documents,
    load_task_file,
    load_tasks,
    multi_document_prompt,
    multi_document_schema,
    single_module_schema,
    split_documents,
    split_template,
)
from benchmarks.metrics import DATASET_METRIC, score

DATA_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "data"
SAMPLES = ("qa_sample", "trec_sample", "passage_retrieval_sample", "multidoc_sample")


def record(**overrides) -> dict:
    base = {"context": "Some context.", "input": "A question?", "answers": ["yes"], "all_classes": None}
    return {**base, **overrides}


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def example(context: str = "ctx", question: str = "q?", dataset: str = "hotpotqa") -> Example:
    return Example(context=context, input=question, answers=("a",), all_classes=None,
                   length=len(context.split()), id="x", dataset=dataset)


# --- loading -----------------------------------------------------------------------------------------

def test_load_tasks_reads_jsonl_and_json(tmp_path):
    write_jsonl(tmp_path / "hotpotqa.jsonl", [record(_id="h1", length=7), record()])
    (tmp_path / "trec.json").write_text(json.dumps([record(all_classes=["A", "B"], dataset="trec")]))
    (tmp_path / "notes.txt").write_text("ignored")
    tasks = load_tasks(tmp_path)
    assert sorted(tasks) == ["hotpotqa", "trec"]
    first, second = tasks["hotpotqa"]
    assert (first.id, first.length, first.dataset, first.answers) == ("h1", 7, "hotpotqa", ("yes",))
    assert (second.id, second.length) == ("hotpotqa-1", 2)   # defaults: stem-index, word count
    assert tasks["trec"][0].all_classes == ("A", "B")


def test_load_tasks_selects_and_limits(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [record()] * 5)
    write_jsonl(tmp_path / "b.jsonl", [record()])
    tasks = load_tasks(tmp_path, datasets=["a"], limit=2)
    assert list(tasks) == ["a"] and len(tasks["a"]) == 2


def test_load_tasks_unknown_dataset_lists_available(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [record()])
    with pytest.raises(TaskFormatError, match=r"\['nope'\].*available: \['a'\]"):
        load_tasks(tmp_path, datasets=["nope"])


def test_load_tasks_missing_directory(tmp_path):
    with pytest.raises(TaskFormatError, match="no task directory"):
        load_tasks(tmp_path / "absent")


@pytest.mark.parametrize("field", ["context", "input", "answers", "all_classes"])
def test_missing_field_names_file_line_and_field(tmp_path, field):
    bad = record()
    del bad[field]
    path = write_jsonl(tmp_path / "t.jsonl", [record(), bad])
    with pytest.raises(TaskFormatError, match=rf"t\.jsonl:2: missing field\(s\) {field}"):
        load_task_file(path)


@pytest.mark.parametrize("overrides, message", [
    ({"answers": "yes"}, "answers must be a list"),
    ({"all_classes": "A"}, "all_classes must be a list or null"),
    ({"context": 3}, "context must be a string"),
])
def test_wrong_field_types(tmp_path, overrides, message):
    path = write_jsonl(tmp_path / "t.jsonl", [record(**overrides)])
    with pytest.raises(TaskFormatError, match=message):
        load_task_file(path)


def test_invalid_json_names_the_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(record()) + "\n\n{not json\n")
    with pytest.raises(TaskFormatError, match=r"t\.jsonl:3: invalid JSON"):
        load_task_file(path)


def test_json_file_must_hold_a_list(tmp_path):
    (tmp_path / "t.json").write_text(json.dumps(record()))
    with pytest.raises(TaskFormatError, match="JSON list"):
        load_task_file(tmp_path / "t.json")


# --- the shipped samples ---------------------------------------------------------------------------

def test_samples_load_and_are_small():
    tasks = load_tasks(DATA_DIR)
    assert set(SAMPLES) <= set(tasks)
    for name in SAMPLES:
        assert 5 <= len(tasks[name]) <= 8, name
        for ex in tasks[name]:
            assert 100 <= len(ex.context.split()) <= 400, ex.id
            assert ex.dataset in DATASET_METRIC and ex.dataset in TEMPLATES


def test_samples_answers_score_perfectly():
    for examples in load_tasks(DATA_DIR, datasets=SAMPLES).values():
        for ex in examples:
            assert score(ex.dataset, ex.answers[0], ex.answers, ex.all_classes) == 1.0, ex.id


def test_sample_answers_are_grounded_in_context():
    for examples in load_tasks(DATA_DIR, datasets=["qa_sample", "multidoc_sample"]).values():
        for ex in examples:
            assert any(a.lower() in ex.context.lower() for a in ex.answers), ex.id


def test_multidoc_sample_shares_documents():
    examples = load_tasks(DATA_DIR, datasets=["multidoc_sample"])["multidoc_sample"]
    per_example = sum(len(split_documents(ex.context)) for ex in examples)
    assert per_example == 3 * len(examples)
    assert len(collect_documents(examples)) == 8 < per_example


# --- PML -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["plain", "a ]]> b", "]]>]]>", "<tag> & ]]", ""])
def test_cdata_round_trips(text):
    assert (ET.fromstring(f"<m>{cdata(text)}</m>").text or "") == text


def test_split_template_keeps_input_after_context():
    for dataset in TEMPLATES:
        before, after = split_template(dataset)
        assert "{input}" not in before and "{context}" not in before + after
    assert split_template("unknown") == ("", "\n\nQuestion: {input}\nAnswer:")
    assert split_template("hotpotqa_e") == split_template("hotpotqa")


def test_single_module_schema_is_valid_xml_with_context_module():
    ex = example(context="Passage ]]> with <xml> & {braces}", question="Is 1 < 2 & {x}?")
    pml = single_module_schema(ex, "doc_1")
    schema, prompt = ET.fromstring(pml.schema), ET.fromstring(pml.prompt)
    assert schema.get("name") == "doc_1"
    assert schema.text.startswith("Answer the question based on the given passages.")
    (module,) = schema.findall("module")
    assert (module.get("name"), module.text) == ("context", ex.context)
    assert prompt.get("schema") == "doc_1"
    assert [child.tag for child in prompt] == ["context", "user"]
    assert prompt.find("user").text.endswith("Question: Is 1 < 2 & {x}?\nAnswer:")


def test_single_module_schema_template_override():
    pml = single_module_schema(example(dataset="hotpotqa"), "s", dataset="nothing_known")
    assert ET.fromstring(pml.schema).text is None
    assert ET.fromstring(pml.prompt).find("user").text == "\n\nQuestion: q?\nAnswer:"


@pytest.mark.parametrize("name", ["1abc", "has space", "", 'q"uote'])
def test_invalid_names_are_rejected(name):
    with pytest.raises(TaskFormatError, match="invalid PML name"):
        single_module_schema(example(), name)


def test_split_documents():
    context = "Intro text.\nPassage 1:\nFirst doc.\nPassage 2: Second doc.\n\nParagraph 10:\nThird."
    assert split_documents(context) == ["Intro text.", "First doc.", "Second doc.", "Third."]
    assert split_documents("  No headers here. ") == ["No headers here."]
    assert split_documents("Mid-line Passage 3: is not a header") == ["Mid-line Passage 3: is not a header"]


def test_multi_document_schema_dedupes_and_prompts_select_own_docs():
    a = example("Passage 1:\nAlpha\nPassage 2:\nBeta", "qa?")
    b = example("Passage 1:\nGamma\nPassage 2:\nAlpha", "qb?")
    schema = ET.fromstring(multi_document_schema([a, b], "corpus"))
    modules = schema.findall("module")
    assert [m.get("name") for m in modules] == ["doc0", "doc1", "doc2"]
    assert [m.text for m in modules] == ["Passage:\nAlpha\n\n", "Passage:\nBeta\n\n", "Passage:\nGamma\n\n"]
    assert schema.text.startswith("Answer the question")
    prompt = ET.fromstring(multi_document_prompt(b, [a, b], "corpus"))
    assert prompt.get("schema") == "corpus"
    assert [child.tag for child in prompt] == ["doc2", "doc0", "user"]
    assert prompt.find("user").text.endswith("Question: qb?\nAnswer:")


def test_multi_document_from_plain_documents():
    docs = ["Alpha", "Beta", "Alpha"]
    schema = ET.fromstring(multi_document_schema(docs, "s"))
    assert len(schema.findall("module")) == 2 and schema.text is None
    # The collected list works as the corpus argument too.
    prompt = multi_document_prompt(example("Passage 1:\nBeta"), collect_documents(docs), "s")
    assert "<doc1/><user>" in prompt


def test_multi_document_prompt_rejects_foreign_documents():
    with pytest.raises(TaskFormatError, match="not in schema 's'"):
        multi_document_prompt(example("Passage 1:\nUnseen"), ["Alpha"], "s")


def test_samples_translate_to_valid_xml():
    tasks = load_tasks(DATA_DIR, datasets=SAMPLES)
    for examples in tasks.values():
        for ex in examples:
            schema, prompt = single_module_schema(ex, "s")
            assert ET.fromstring(schema).find("module").text == ex.context
            ET.fromstring(prompt)
    multidoc = tasks["multidoc_sample"]
    ET.fromstring(multi_document_schema(multidoc, "md"))
    for ex in multidoc:
        assert len(ET.fromstring(multi_document_prompt(ex, multidoc, "md"))) == 4


def test_samples_parse_with_promptcache_markup_exactly():
    parse = pytest.importorskip("promptcache.markup.parse")
    tasks = load_tasks(DATA_DIR, datasets=SAMPLES)
    for ex in [*tasks["qa_sample"][:2], *tasks["trec_sample"][:1], example(context="a ]]> b")]:
        schema, prompt = single_module_schema(ex, "s")
        (module,) = [n for n in parse.parse_schema(schema).children if getattr(n, "name", None) == "context"]
        assert "".join(t.text for t in module.children) == ex.context   # xml:space keeps it verbatim
        assert [s.name for s in parse.parse_prompt(prompt).selections] == ["context"]
    multidoc = tasks["multidoc_sample"]
    parse.parse_schema(multi_document_schema(multidoc, "md"))
    selections = parse.parse_prompt(multi_document_prompt(multidoc[0], multidoc, "md")).selections
    assert [s.name for s in selections] == ["doc0", "doc1", "doc2"]


def test_characters_xml_cannot_hold_are_dropped():
    ex = example(context="page\x0cbreak\x00", question="bell\x07?")
    schema, prompt = single_module_schema(ex, "s")
    assert ET.fromstring(schema).find("module").text == "pagebreak"
    assert ET.fromstring(prompt).find("user").text.endswith("Question: bell?\nAnswer:")
