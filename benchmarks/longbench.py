"""LongBench-format tasks from local files, and their translation into PML for the two benchmark setups.

A task file is JSONL (one object per line) or JSON (a list of objects), named `<dataset>.jsonl`;
each object has LongBench's fields `context`, `input`, `answers`, `all_classes` (null unless the
task is classification) and optionally `length`, `dataset`, `_id`.

The two setups:
- single module (the paper's): the whole context is one module; the question is the user turn.
- multi document: the contexts are split into documents, every distinct document becomes one
  module of a shared schema, and each question imports only its own documents, so their cached
  positions are not contiguous (where splicing approximates the full prefill).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple
from xml.sax.saxutils import escape

from promptcache.errors import PromptCacheError

REQUIRED_FIELDS = ("context", "input", "answers", "all_classes")
NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


class TaskFormatError(PromptCacheError):
    """A task file is not in LongBench format; the message names the file, line and field."""


@dataclass(frozen=True)
class Example:
    """One LongBench example; `dataset` picks the metric and the instruction template."""

    context: str
    input: str
    answers: tuple[str, ...]
    all_classes: tuple[str, ...] | None
    length: int
    id: str
    dataset: str


class PmlPrompt(NamedTuple):
    """A schema and a prompt over it, both PML strings."""

    schema: str
    prompt: str


# --- loading ---------------------------------------------------------------------------------------

def _records(path: Path) -> Iterable[tuple[str, object]]:
    """(where, parsed object): "file:line" for JSONL, "file: record n" for a JSON list."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise TaskFormatError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        if not isinstance(data, list):
            raise TaskFormatError(f"{path}: expected a JSON list of examples, got {type(data).__name__}")
        yield from ((f"{path}: record {n}", record) for n, record in enumerate(data, start=1))
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{lineno}", json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskFormatError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None


def _example(record: object, where: str, dataset: str, default_id: str) -> Example:
    if not isinstance(record, dict):
        raise TaskFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [f for f in REQUIRED_FIELDS if f not in record]
    if missing:
        raise TaskFormatError(f"{where}: missing field(s) {', '.join(missing)}; "
                              f"required: {', '.join(REQUIRED_FIELDS)}")
    answers, classes = record["answers"], record["all_classes"]
    if isinstance(answers, str) or not isinstance(answers, list):
        raise TaskFormatError(f"{where}: field answers must be a list of strings, got {answers!r}")
    if classes is not None and not isinstance(classes, list):
        raise TaskFormatError(f"{where}: field all_classes must be a list or null, got {classes!r}")
    for field in ("context", "input"):
        if not isinstance(record[field], str):
            raise TaskFormatError(f"{where}: field {field} must be a string, got {record[field]!r}")
    context = record["context"]
    return Example(
        context=context, input=record["input"],
        answers=tuple(str(a) for a in answers),
        all_classes=None if classes is None else tuple(str(c) for c in classes),
        length=int(record.get("length") or len(context.split())),
        id=str(record.get("_id") or record.get("id") or default_id),
        dataset=str(record.get("dataset") or dataset),
    )


def load_task_file(path: str | Path, limit: int | None = None) -> list[Example]:
    """Read one LongBench task file (.jsonl or .json); the file stem is the default dataset name."""
    path = Path(path)
    examples = []
    for where, record in _records(path):
        if limit is not None and len(examples) >= limit:
            break
        examples.append(_example(record, where, path.stem, f"{path.stem}-{len(examples)}"))
    return examples


def load_tasks(data_dir: str | Path, datasets: Sequence[str] | None = None,
               limit: int | None = None) -> dict[str, list[Example]]:
    """Load LongBench tasks from `data_dir`.

    Args:
        data_dir: a directory of `<name>.jsonl` / `<name>.json` files.
        datasets: file stems to load (default: every task file there).
        limit: at most this many examples per task.

    Returns:
        File stem -> its examples, in file order.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise TaskFormatError(f"no task directory at {data_dir}")
    files = {p.stem: p for p in sorted(data_dir.iterdir()) if p.suffix in (".jsonl", ".json")}
    wanted = sorted(files) if datasets is None else list(datasets)
    unknown = [name for name in wanted if name not in files]
    if unknown:
        raise TaskFormatError(f"no task file for {unknown} in {data_dir}; available: {sorted(files)}")
    return {name: load_task_file(files[name], limit) for name in wanted}


# --- instruction templates ---------------------------------------------------------------------------

# LongBench's dataset2prompt.json, English sets, reproduced by hand (wording may differ in whitespace
# and a word here and there from the upstream file). {context} goes in a module, the rest is prompt text.
_PASSAGES_QA = ("Answer the question based on the given passages. Only give me the answer and do not "
                "output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the "
                "question based on the given passages. Only give me the answer and do not output any "
                "other words.\n\nQuestion: {input}\nAnswer:")
TEMPLATES: dict[str, str] = {
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. "
                   "Answer the question as concisely as you can, using a single phrase if possible. Do "
                   "not provide any explanation.\n\nStory: {context}\n\nNow, answer the question based "
                   "on the story as concisely as you can, using a single phrase if possible. Do not "
                   "provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    "qasper": "You are given a scientific article and a question. Answer the question as concisely as you "
              "can, using a single phrase or sentence if possible. If the question cannot be answered "
              "based on the information in the article, write \"unanswerable\".\n\nArticle: {context}\n\n"
              "Answer the question based on the above article as concisely as you can.\n\n"
              "Question: {input}\n\nAnswer:",
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the "
                       "following question based on the above text, only give me the answer and do not "
                       "output any other words.\n\nQuestion: {input}\nAnswer:",
    "hotpotqa": _PASSAGES_QA, "2wikimqa": _PASSAGES_QA, "musique": _PASSAGES_QA,
    "gov_report": "You are given a report by a government agency. Write a one-page summary of the report."
                  "\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
    "qmsum": "You are given a meeting transcript and a query containing a question or instruction. Answer "
             "the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query "
             "based on the above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
    "multi_news": "You are given several news passages. Write a one-page summary of all news.\n\nNews:\n"
                  "{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:",
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n"
            "{context}\n{input}",
    "triviaqa": "Answer the question based on the given passage. Only give me the answer and do not output "
                "any other words. The following are some examples.\n\n{context}\n\n{input}",
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n"
              "{context}\n\n{input}",
    "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be "
                     "duplicates. Please carefully read these paragraphs and determine how many unique "
                     "paragraphs there are after removing duplicates.\n\n{context}\n\nPlease enter the "
                     "final count of unique paragraphs after removing duplicates. The output format should "
                     "only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ",
    "passage_retrieval_en": "Here are some paragraphs from Wikipedia, along with an abstract. Please "
                            "determine which paragraph the abstract is from.\n\n{context}\n\nThe following "
                            "is an abstract.\n\n{input}\n\nPlease enter the number of the paragraph that "
                            "the abstract is from. The answer format must be like \"Paragraph 1\", "
                            "\"Paragraph 2\", etc.\n\nThe answer is: ",
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}
DEFAULT_TEMPLATE = "{context}\n\nQuestion: {input}\nAnswer:"


def split_template(dataset: str) -> tuple[str, str]:
    """(instruction before the context, text after it with an `{input}` slot) for a dataset."""
    base = dataset[:-2] if dataset.endswith("_e") and dataset[:-2] in TEMPLATES else dataset
    before, after = TEMPLATES.get(base, DEFAULT_TEMPLATE).split("{context}")
    assert "{input}" not in before, f"template for {dataset} asks for the input before the context"
    return before, after


# --- PML ---------------------------------------------------------------------------------------------

# Characters XML 1.0 forbids even in CDATA (C0 controls but tab/LF/CR, surrogates, U+FFFE/U+FFFF).
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def xml_text(text: str) -> str:
    """`text` escaped for XML character data; characters XML cannot hold are dropped."""
    return escape(_NOT_XML.sub("", text))


def cdata(text: str) -> str:
    """`text` as CDATA; a `]]>` inside is split across two sections so it survives the round trip.

    Characters XML cannot hold at all (e.g. a form feed in code) are dropped.
    """
    return "<![CDATA[" + _NOT_XML.sub("", text).replace("]]>", "]]]]><![CDATA[>") + "]]>"


def check_name(name: str) -> str:
    """`name` if it is a valid PML schema/module name, else a `TaskFormatError`."""
    if not NAME_PATTERN.fullmatch(name):
        raise TaskFormatError(f"invalid PML name {name!r}: must match {NAME_PATTERN.pattern}")
    return name


# NOTE: xml:space="preserve" keeps LongBench's exact text: PML otherwise dedents and trims each text run.
_PRESERVE = 'xml:space="preserve"'


def _user_turn(example: Example, after: str) -> str:
    # str.replace, not str.format: the question may contain braces.
    return "<user>" + xml_text(after.replace("{input}", example.input)) + "</user>"


def single_module_schema(example: Example, name: str, dataset: str | None = None) -> PmlPrompt:
    """The paper's setup: the whole context as module `context`, the question as the user turn.

    Args:
        example: the example to translate.
        name: the schema name (a valid PML name).
        dataset: the template to use (default: `example.dataset`).

    Returns:
        `PmlPrompt(schema, prompt)`; the instruction preceding the context is schema text.
    """
    before, after = split_template(dataset or example.dataset)
    schema = (f'<schema name="{check_name(name)}" {_PRESERVE}>{xml_text(before)}'
              f'<module name="context">{cdata(example.context)}</module></schema>')
    prompt = f'<prompt schema="{name}" {_PRESERVE}><context/>{_user_turn(example, after)}</prompt>'
    return PmlPrompt(schema, prompt)


# --- many documents ----------------------------------------------------------------------------------

# A document starts at a line "Passage N:", "Paragraph N:" or "Document N:" (LongBench's own
# multi-hop and retrieval contexts use the first two); text before the first header is a document too.
DOCUMENT_HEADER = re.compile(r"^(?:Passage|Paragraph|Document) \d+:[ \t]*\n?", re.MULTILINE)
# NOTE: the number is dropped from the module text: it differs between the examples sharing a document.
MODULE_TEXT = "Passage:\n{document}\n\n"


def split_documents(context: str) -> list[str]:
    """The documents of a multi-document context, stripped, headers removed; no header: one document."""
    pieces = DOCUMENT_HEADER.split(context)
    return [p.strip() for p in pieces if p.strip()]


def collect_documents(examples_or_docs: Sequence[Example] | Sequence[str]) -> list[str]:
    """Distinct documents in first-seen order; module `doc{i}` holds document i.

    Strings are taken as documents as they are; examples are split with `split_documents`.
    """
    seen: dict[str, None] = {}
    for item in examples_or_docs:
        docs = [item.strip()] if isinstance(item, str) else split_documents(item.context)
        seen.update((d, None) for d in docs if d)
    return list(seen)


def _schema_dataset(examples_or_docs: Sequence[Example] | Sequence[str], dataset: str | None) -> str:
    if dataset is not None:
        return dataset
    first = next(iter(examples_or_docs), None)
    return first.dataset if isinstance(first, Example) else ""


def multi_document_schema(examples_or_docs: Sequence[Example] | Sequence[str], name: str,
                          dataset: str | None = None) -> str:
    """One schema holding every distinct document as module `doc{i}`.

    Args:
        examples_or_docs: examples (their contexts are split) or documents.
        name: the schema name (a valid PML name).
        dataset: the template whose instruction opens the schema (default: the first example's).

    Returns:
        The schema's PML.
    """
    before, _ = split_template(_schema_dataset(examples_or_docs, dataset))
    modules = "".join(f'<module name="doc{i}">{cdata(MODULE_TEXT.format(document=doc))}</module>'
                      for i, doc in enumerate(collect_documents(examples_or_docs)))
    return f'<schema name="{check_name(name)}" {_PRESERVE}>{xml_text(before)}{modules}</schema>'


def multi_document_prompt(example: Example, examples_or_docs: Sequence[Example] | Sequence[str],
                          name: str, dataset: str | None = None) -> str:
    """A prompt over `multi_document_schema(examples_or_docs, name)` importing only `example`'s documents.

    Args:
        example: the question to ask; its documents must be in the schema.
        examples_or_docs: what the schema was built from (or `collect_documents` of it).
        name: the schema name.
        dataset: the template whose question part ends the prompt (default: `example.dataset`).

    Returns:
        The prompt's PML: the example's modules in its own order, then the user turn.
    """
    index = {doc: i for i, doc in enumerate(collect_documents(examples_or_docs))}
    own = list(dict.fromkeys(split_documents(example.context)))
    absent = [doc[:40] for doc in own if doc not in index]
    if absent:
        raise TaskFormatError(f"example {example.id}: document(s) {absent} are not in schema {name!r}")
    _, after = split_template(dataset or example.dataset)
    imports = "".join(f"<doc{index[doc]}/>" for doc in own)
    return f'<prompt schema="{check_name(name)}" {_PRESERVE}>{imports}{_user_turn(example, after)}</prompt>'
