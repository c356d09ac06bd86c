"""The serving benchmark's workloads: what each streamed request sends, to promptcache and to its peers.

    prefix:N   chat requests: one shared system prompt of ~N tokens (a deployment's instructions),
               then a distinct user question per request (every server's prefix caching applies)
    module:N   completions: a ~N-token document, then a distinct question. promptcache gets the
               document as a PML module (a schema added once, spliced per request); the peers get
               the same text as a plain prompt and reuse it through their prefix caching
    mix:N      prefix:N streams, and once every client has finished its first request, one
               uncached plain prompt of `long_tokens` (default 4096) tokens, a new first line each
               time, so that no cache holds any of it: how much its prefill stalls the streams

Questions are numbered: request `i` of a level sends question `i` to every server, so all
servers answer the same questions.
"""

from __future__ import annotations

from dataclasses import dataclass

from promptcache.markup.builder import SchemaBuilder, make_prompt, prompt_to_xml, schema_to_xml, select

KINDS = ("prefix", "module", "mix")
LONG_TOKENS = 4096
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"

_TOPICS = ("the weather", "a train timetable", "a recipe", "the history of tea", "a chess opening", "the moon",
           "a bicycle repair", "a birthday gift", "learning French", "saving money", "the ocean", "a garden")
_ASKS = ("Tell me something useful about", "Write a short story about", "Explain to a child",
         "List three facts about", "Describe in detail")


@dataclass(frozen=True)
class WorkloadSpec:
    """A workload kind and its shared context size in tokens."""

    kind: str
    tokens: int

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.tokens}"


def parse_workloads(text: str) -> list[WorkloadSpec]:
    """`"prefix:1024,module:2048,mix:1024"` -> specs.

    Raises:
        ValueError: an entry that is not KIND:TOKENS with a known kind and 1..8192 tokens.
    """
    specs = []
    for entry in (e.strip() for e in text.split(",")):
        kind, sep, tokens = entry.partition(":")
        if not sep or kind not in KINDS or not tokens.isdigit() or not 1 <= int(tokens) <= 8192:
            raise ValueError(f"workload {entry!r}: expected KIND:TOKENS with KIND one of {', '.join(KINDS)} "
                             "and TOKENS in 1..8192, e.g. prefix:1024")
        specs.append(WorkloadSpec(kind, int(tokens)))
    return specs


def question(i: int) -> str:
    """Question `i`: distinct for every `i` from its first words on (short common prefixes only)."""
    ask = _ASKS[i % len(_ASKS)]
    topic = _TOPICS[(i // len(_ASKS)) % len(_TOPICS)]
    return f"Request {i}. {ask} {topic}, in about a hundred words."


@dataclass(frozen=True)
class Call:
    """One request: the endpoint path and its JSON body, without the sampling fields the client adds."""

    path: str
    body: dict


@dataclass(frozen=True)
class Workload:
    """A spec with its texts: `context` is the shared system prompt or document; `schema` is the PML
    schema promptcache adds for a module workload; `long_text` the mix workload's uncached prompt."""

    spec: WorkloadSpec
    context: str
    schema_name: str | None = None
    schema: str | None = None
    long_text: str | None = None

    def call(self, i: int, pml: bool) -> Call:
        """Request `i`; `pml`: the server takes PML (promptcache), else the plain-text equivalent."""
        q = question(i)
        if self.spec.kind != "module":
            return Call(CHAT, {"messages": [{"role": "system", "content": self.context},
                                            {"role": "user", "content": q}]})
        tail = f"\n\n{q}\nAnswer:"
        if pml:
            return Call(COMPLETIONS, {"prompt": prompt_to_xml(make_prompt(self.schema_name, select("doc"),
                                                                          text=tail))})
        return Call(COMPLETIONS, {"prompt": self.context + tail})

    def long_call(self, nonce: int) -> Call | None:
        """The mix workload's uncached prompt; `nonce` makes its first tokens new (None: not a mix)."""
        if self.long_text is None:
            return None
        return Call(COMPLETIONS, {"prompt": f"Report {nonce}. Summarise what follows.\n{self.long_text}"})


def build(spec: WorkloadSpec, tokenizer, filler, long_tokens: int = LONG_TOKENS) -> Workload:
    """The texts of `spec`; `filler(tokenizer, n, seed)` makes ~n tokens of prose (benchmarks.common)."""
    def text(head: str, seed: int) -> str:  # ~spec.tokens in all
        rest = spec.tokens - len(tokenizer(head, add_special_tokens=False).input_ids)
        return head + filler(tokenizer, max(rest, 1), seed)

    if spec.kind == "module":
        doc = text("A report on the travel agency's year. ", 4321)
        name = f"serve-doc-{spec.tokens}"
        b = SchemaBuilder(name)
        with b.module("doc"):
            b.text(doc)
        return Workload(spec, doc, name, schema_to_xml(b.build()))
    system = text("You are the assistant of a travel agency. Policies follow. ", 1234)
    long_text = filler(tokenizer, long_tokens, 777) if spec.kind == "mix" else None
    return Workload(spec, system, long_text=long_text)
