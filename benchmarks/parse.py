"""PML parse + validation time against document size, for every shape of hostile input.

Each shape is a document made of one unit repeated k times (attributes on one selection,
sibling selections, nesting to the depth limit, entities, character references, long text, chat
turns, modules, parameters...). For each shape the document doubles in size up to the parser's
limit (`parse_prompt`: 1 MiB, `parse_schema`: 8 MiB); the last row of each shape is a document at
the server's 16 MiB body limit, refused by size before parsing. Printed per size: median seconds
of `parse_prompt` / `parse_schema` (which include `check`), microseconds per KiB, and the ratio to
the half-size row: about 2 is linear, 4 quadratic.

    python benchmarks/parse.py                  # every shape, 128 KiB .. each limit
    python benchmarks/parse.py --quick          # 64 .. 256 KiB
    python benchmarks/parse.py --shapes prompt-attributes,schema-modules
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import load_average, result_payload, table, write_json  # noqa: E402
from promptcache.errors import PromptCacheError  # noqa: E402
from promptcache.markup.parse import parse_prompt, parse_schema  # noqa: E402

PROMPT_LIMIT, SCHEMA_LIMIT, BODY_LIMIT = 1 << 20, 8 << 20, 16 << 20
NEST = 60  # levels of one nested group (the limit is 64, the document element included)


@dataclass(frozen=True)
class Shape:
    """A document kind ("prompt" or "schema") whose text `make(k)` grows with k units."""

    name: str
    kind: str
    make: Callable[[int], str]

    def parse(self, text: str) -> object:
        """Parse and validate with the parser's default limit, as the engine and the server do."""
        return (parse_prompt if self.kind == "prompt" else parse_schema)(text)

    def of_size(self, n_bytes: int) -> str:
        """A document of about `n_bytes` (units may grow with k: attribute names get longer)."""
        one, two = len(self.make(1).encode()), len(self.make(2).encode())
        k = max(1, (n_bytes - one) // max(1, two - one) + 1)
        k = max(1, k * n_bytes // len(self.make(k).encode()))
        return self.make(k)


def _prompt(body: str, attrs: str = "") -> str:
    return f'<prompt schema="s"{attrs}>{body}</prompt>'


def _schema(body: str) -> str:
    return f'<schema name="s">{body}</schema>'


def _nested(tag: str, k: int, attrs: Callable[[int, int], str] = lambda i, d: "") -> str:
    """k groups of `NEST` nested elements."""
    return "".join("".join(f"<{tag}{attrs(i, d)}>" for d in range(NEST)) + f"</{tag}>" * NEST for i in range(k))


SHAPES = [
    Shape("prompt-attributes", "prompt", lambda k: _prompt("<m " + " ".join(f'a{i}="v"' for i in range(k)) + "/>")),
    Shape("prompt-selections", "prompt", lambda k: _prompt("<a/>" * k)),
    Shape("prompt-nesting", "prompt", lambda k: _prompt(_nested("a", k))),
    Shape("prompt-entities", "prompt", lambda k: _prompt("&amp;&lt;" * k)),
    Shape("prompt-charrefs", "prompt", lambda k: _prompt("&#x1F31F;x" * k)),
    Shape("prompt-text", "prompt", lambda k: _prompt("lorem ipsum\n" * k)),
    Shape("prompt-turns", "prompt", lambda k: _prompt("<user>hi</user><assistant>yo</assistant>" * k)),
    Shape("prompt-long-argument", "prompt", lambda k: _prompt('<m a="' + "x&amp;" * k + '"/>')),
    Shape("schema-modules", "schema", lambda k: _schema("".join(f'<module name="m{i}">x</module>' for i in range(k)))),
    Shape("schema-parameters", "schema", lambda k: _schema(
        '<module name="m">' + "".join(f'<parameter name="p{i}" length="4"/>' for i in range(k)) + "</module>")),
    Shape("schema-nesting", "schema", lambda k: _schema(_nested("module", k, lambda i, d: f' name="m{i}_{d}"'))),
    Shape("schema-attributes", "schema", lambda k: _schema(
        '<module name="m" ' + " ".join(f'a{i}="v"' for i in range(k)) + "/>")),  # refused: unknown a0=
    Shape("schema-entities", "schema", lambda k: _schema('<module name="m">' + "&amp;&#65;" * k + "</module>")),
    Shape("schema-text", "schema", lambda k: _schema('<module name="m">' + "lorem ipsum\n" * k + "</module>")),
]

COLUMNS = [("shape", "shape", ""), ("bytes", "bytes", "d"), ("seconds", "seconds", ".3f"),
           ("us_per_kib", "us/KiB", ".0f"), ("doubling_ratio", "x prev", ".2f"), ("outcome", "outcome", "")]


def measure(shape: Shape, n_bytes: int, repeat: int) -> dict:
    """Median seconds of parsing a document of `n_bytes` of `shape` (a refusal is timed too)."""
    text = shape.of_size(n_bytes)
    times, outcome = [], "ok"
    for _ in range(repeat):
        t0 = time.perf_counter()
        try:
            shape.parse(text)
        except PromptCacheError as e:
            outcome = f"refused: {str(e).split(': ', 1)[-1][:48]}"
        times.append(time.perf_counter() - t0)
    size = len(text.encode())
    seconds = statistics.median(times)
    return {"shape": shape.name, "kind": shape.kind, "bytes": size, "seconds": seconds,
            "us_per_kib": seconds * 1e6 / (size / 1024), "outcome": outcome}


def sizes(kind: str, quick: bool) -> list[int]:
    top = (256 << 10) if quick else PROMPT_LIMIT if kind == "prompt" else SCHEMA_LIMIT
    out, n = [], (64 << 10) if quick else (128 << 10)
    while n <= top:
        out.append(n)
        n *= 2
    return out


def run(shapes: list[Shape], quick: bool, repeat: int) -> list[dict]:
    rows = []
    for shape in shapes:
        before = None
        for n in sizes(shape.kind, quick):
            row = measure(shape, n, repeat if n <= PROMPT_LIMIT else 1)
            row["doubling_ratio"] = row["seconds"] / before["seconds"] if before else None
            rows.append(row)
            print(table([row], COLUMNS).splitlines()[-1], flush=True)
            before = row
        if not quick:  # a body at the server's limit: over the parser's, refused before parsing
            rows.append(measure(shape, BODY_LIMIT, 1))
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=",".join(s.name for s in SHAPES), help="comma-separated shape names")
    p.add_argument("--quick", action="store_true", help="64 to 256 KiB only")
    p.add_argument("--repeat", type=int, default=3, help="repetitions per size up to 1 MiB (1 above)")
    p.add_argument("--out", default="benchmarks/results", help="directory for the JSON")
    p.add_argument("--name", default="parse-cpu", help="file stem of the output")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    by_name = {s.name: s for s in SHAPES}
    unknown = sorted(set(args.shapes.split(",")) - set(by_name))
    if unknown:
        sys.exit(f"unknown shapes {unknown}; valid: {', '.join(by_name)}")
    load_start = load_average()
    print(table([], COLUMNS))
    rows = run([by_name[n] for n in args.shapes.split(",")], args.quick, args.repeat)
    print("\n" + table(rows, COLUMNS))
    worst = max((r["doubling_ratio"] for r in rows if r.get("doubling_ratio")), default=None)
    print(f"\nworst doubling ratio: {worst:.2f} (2 is linear, 4 quadratic)" if worst else "")
    payload = result_payload("parse", "cpu", "n/a", load_start, argv, rows)
    print(f"wrote {write_json(args.out, f'{args.name}.json', payload)}")


if __name__ == "__main__":
    main()
