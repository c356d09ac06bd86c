"""promptcache demo: encode a schema's modules once, then answer a prompt by splicing their states.

    python demo.py --enable_cache=True            # built-in random-weight Llama, offline
    python demo.py --compare                      # cached vs. uncached: TTFT, speed-up, same output?
    python demo.py --model meta-llama/Llama-2-7b-chat-hf --compare   # a real model (GPU if present)

The default schema is schemas/codegen.xml (a small Python package, one module per file) with the
question in schemas/codegen.prompt.xml. User mistakes (bad path, bad PML) print one line with
file:line:col and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Built-in model shapes (Llama architecture, random weights). "demo" makes the uncached TTFT of
# the codegen prompt (~7.6k tokens) take seconds on a 2-core CPU; "tiny" is for fast tests.
SHAPES = {"demo": dict(hidden_size=512, num_layers=4), "tiny": dict(hidden_size=64, num_layers=2)}

BANNER = """\
==============================================================================
 Built-in model: Llama architecture, hidden {hidden_size}, {num_layers} layers, RANDOM WEIGHTS.
 Its text is meaningless; it is here to show timing and that cached == uncached.
 For real answers: python demo.py --model <hub id or local checkpoint>
=============================================================================="""


def parse_bool(value: str) -> bool:
    v = value.strip().lower()
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True/False/true/false/1/0, got {value!r}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--enable_cache", type=parse_bool, default=True, metavar="True|False",
                   help="splice precomputed module states (True, default) or prefill everything (False)")
    p.add_argument("--compare", action="store_true", help="run cached and uncached; compare TTFT and output")
    p.add_argument("--model", metavar="PATH_OR_ID", help="a transformers checkpoint; default: built-in model")
    p.add_argument("--model_size", choices=sorted(SHAPES), default="demo",
                   help="shape of the built-in model (tiny: for tests)")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--schema", default=str(HERE / "schemas" / "codegen.xml"), metavar="FILE")
    p.add_argument("--prompt", default=str(HERE / "schemas" / "codegen.prompt.xml"), metavar="FILE")
    return p.parse_args(argv)


def load_engine(args: argparse.Namespace):
    from promptcache.cli import build_engine

    if args.model is not None:
        print(f"Loading {args.model} ...", flush=True)
        return build_engine(model=args.model, tiny=None, device=args.device)
    shape = SHAPES[args.model_size]
    print(BANNER.format(**shape), flush=True)
    return build_engine(model=None, tiny="llama", device=args.device, **shape)


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


def demo(args: argparse.Namespace) -> None:
    from promptcache.markup.parse import parse_prompt, parse_schema

    # Check both documents before building a model, so that a typo fails in a second.
    schema = parse_schema(args.schema)
    prompt = parse_prompt(args.prompt)
    engine = load_engine(args)
    print(f"Encoding the modules of {args.schema} (once; later prompts reuse them) ...", flush=True)
    layout = engine.add_schema(schema)
    print(f"schema '{layout.name}': {layout.length} positions, {len(layout.modules) - 1} modules", flush=True)
    if not args.compare:
        run_once(engine, prompt, args.enable_cache, args.max_new_tokens)
        return
    text_c, usage_c = run_once(engine, prompt, True, args.max_new_tokens)
    text_u, usage_u = run_once(engine, prompt, False, args.max_new_tokens)
    print("\n=== comparison ===")
    print(f"TTFT cached:   {usage_c.ttft_s * 1000:8.0f} ms  ({usage_c.cached_tokens} of "
          f"{usage_c.input_tokens} prompt tokens spliced from the module store)")
    print(f"TTFT uncached: {usage_u.ttft_s * 1000:8.0f} ms  (all {usage_u.input_tokens} prompt tokens "
          "prefilled)")
    print(f"speed-up:      {usage_u.ttft_s / usage_c.ttft_s:8.1f}x")
    same = text_c == text_u
    print(f"outputs match: {'yes' if same else 'no'}"
          + ("" if same else " (expected for modules whose splice is approximate; see README)"))


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
