"""The quality suite's cases: the docqa task set in four setups, and LongBench-format samples in two.

A `Case` is one prompt (PML over a schema this module adds to the engine), its reference answers
and the metric that scores an output against them. Setups, by how the prompt selects modules:

- exact: every document in schema order: the cached prefill is the full prefill (the control).
- skipped: the question's document and one other: the two skipped ones leave position gaps, and
  what follows them was encoded with them in context.
- union: a union's non-scaffold member (a short preface) before all the documents, which were
  encoded after the scaffold (the union's longest member).
- parameter: a parameter argument (the reader's name) before all the documents, which were
  encoded with the scaffold there.
- retrieved: every group's documents in one schema (32 modules); each prompt asks `retrieve="3"`, and
  the engine splices the three documents nearest the question (`Engine.retrieve`): position gaps and
  states encoded after documents the prompt skips, as in "skipped". The full prefill is of the same
  retrieved text.
- longbench-single / longbench-multi: the shipped LongBench-format samples as `longbench.py`
  lays them out (one module per context: exact; each question importing its own documents from a
  shared schema: approximate).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from benchmarks.longbench import (
    collect_documents,
    load_tasks,
    multi_document_prompt,
    multi_document_schema,
    single_module_schema,
)
from benchmarks.metrics import contains_answer, score

DATA = Path(__file__).resolve().parent / "data"
DOCQA = DATA / "docqa" / "docqa.json"
DOCQA_SETUPS = ("exact", "skipped", "union", "parameter", "retrieved")
RETRIEVE_K = 3
LONGBENCH_SETUPS = ("longbench-single", "longbench-multi")
SETUPS = DOCQA_SETUPS + LONGBENCH_SETUPS
EXACT_SETUPS = ("exact", "longbench-single")


@dataclass(frozen=True)
class Case:
    """One prompt to answer with and without the cache."""

    setup: str
    dataset: str
    id: str
    prompt: str
    answers: tuple[str, ...]
    metric: Callable[[str], float]  # output -> score in [0, 1]
    style: str = ""
    document: str = ""  # docqa: the module that holds the answer


def load_docqa(path: str | Path = DOCQA) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _modules(docs: Sequence[dict]) -> str:
    return "\n".join(f'  <module name="{d["name"]}">{escape(d["text"])}</module>' for d in docs)


def _schema(name: str, system: str, body: str) -> str:
    return f'<schema name="{name}">\n  <system>{escape(system)}</system>\n{body}\n</schema>'


def _prompt(name: str, selection: str, question: str) -> str:
    return f'<prompt schema="{name}">{selection}<user>{escape(question)}</user></prompt>'


def docqa_cases(engine, setup: str, tasks: dict, per_group: int | None = None) -> list[Case]:
    """Add the schemas `setup` needs (one per document group) and return its cases."""
    if setup == "retrieved":
        return retrieved_cases(engine, tasks, per_group)
    cases = []
    for group in tasks["groups"]:
        docs = group["documents"]
        names = [d["name"] for d in docs]
        schema = f"docqa_{setup}_{group['id']}"
        engine.add_schema(_schema(schema, tasks["system"], _preface(setup, tasks) + _modules(docs)))
        for i, q in enumerate(group["questions"][:per_group]):
            selection = _selection(setup, tasks, names, q["doc"], i)
            answers = tuple(q["answers"])
            cases.append(Case(setup, "docqa", q["id"], _prompt(schema, selection, q["question"]), answers,
                              lambda out, a=answers: max(contains_answer(out, x) for x in a), q["style"],
                              q["doc"]))
    return cases


def retrieved_cases(engine, tasks: dict, per_group: int | None = None) -> list[Case]:
    """One schema of every group's documents; prompts select nothing and ask `retrieve="3"`."""
    schema = "docqa_retrieved"
    docs = [{**d, "name": f"{g['id']}-{d['name']}"} for g in tasks["groups"] for d in g["documents"]]
    engine.add_schema(_schema(schema, tasks["system"], _modules(docs)))
    cases = []
    for group in tasks["groups"]:
        for q in group["questions"][:per_group]:
            answers = tuple(q["answers"])
            prompt = (f'<prompt schema="{schema}" retrieve="{RETRIEVE_K}"><user>{escape(q["question"])}</user>'
                      "</prompt>")
            cases.append(Case("retrieved", "docqa", q["id"], prompt, answers,
                              lambda out, a=answers: max(contains_answer(out, x) for x in a), q["style"],
                              f"{group['id']}-{q['doc']}"))
    return cases


def _preface(setup: str, tasks: dict) -> str:
    if setup == "union":
        u = tasks["union"]
        members = [u["scaffold"], *u["members"]]
        inner = "\n".join(f'    <module name="{n}">{escape(t)}</module>' for n, t in members)
        return f'  <union scaffold="{u["scaffold"][0]}">\n{inner}\n  </union>\n'
    if setup == "parameter":
        p = tasks["parameter"]
        return (f'  <module name="preface">{escape(p["text_before"])}<parameter name="{p["name"]}" '
                f'length="{p["length"]}" scaffold={quoteattr(p["scaffold"])}/>{escape(p["text_after"])}</module>\n')
    return ""


def _selection(setup: str, tasks: dict, names: list[str], doc: str, i: int) -> str:
    """The modules a prompt of `setup` imports for question i about document `doc`."""
    if setup == "skipped":
        others = [n for n in names if n != doc]
        keep = {doc, others[i % len(others)]}
        return "".join(f"<{n}/>" for n in names if n in keep)
    every = "".join(f"<{n}/>" for n in names)
    if setup == "union":
        members = tasks["union"]["members"]
        return f"<{members[i % len(members)][0]}/>" + every
    if setup == "parameter":
        p = tasks["parameter"]
        return f"<preface {p['name']}={quoteattr(p['arguments'][i % len(p['arguments'])])}/>" + every
    return every


def longbench_cases(engine, setup: str, data_dir: str | Path = DATA, datasets: Sequence[str] | None = None,
                    limit: int | None = None) -> list[Case]:
    """The LongBench-format samples: "longbench-single" (exact) or "longbench-multi" (approximate)."""
    cases = []
    for task, examples in load_tasks(data_dir, datasets, limit).items():
        if not examples:
            continue
        dataset = examples[0].dataset
        if setup == "longbench-multi":
            name = _safe(f"lb_m_{task}")
            docs = collect_documents(examples)
            engine.add_schema(multi_document_schema(docs, name, dataset))
            prompts = [multi_document_prompt(ex, docs, name, dataset) for ex in examples]
        else:
            prompts, seen = [], {}
            for i, ex in enumerate(examples):
                name = seen.setdefault(ex.context, _safe(f"lb_s_{task}_{i}"))
                pml = single_module_schema(ex, name, dataset)
                if name == _safe(f"lb_s_{task}_{i}"):
                    engine.add_schema(pml.schema)
                prompts.append(pml.prompt)
        for ex, prompt in zip(examples, prompts, strict=True):
            cases.append(Case(setup, dataset, ex.id, prompt, ex.answers,
                              lambda out, d=dataset, e=ex: score(d, out, e.answers, e.all_classes), task))
    return cases


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c == "_" else "_" for c in name)
