"""Time to first token: uncached prefill vs. spliced module states vs. the ideal.

For each model and context length, one schema holds one module of ~context tokens (deterministic
filler prose) and the prompt imports it and asks a short question. Measured in one run:

- ttft_no_cache_ms: `engine.generate(prompt, max_new_tokens=1, enable_cache=False)`.
- ttft_cache_ms: the same with the cache (modules resident on the model's device).
- ttft_cache_host_ms: the same from an engine whose modules live in host memory (device budget 0).
- ttft_ideal_ms: the floor for any prefix cache: a bare transformers forward over the same new
  tokens, at the same positions, with a `StaticCache` already holding the same prefix states and
  room for exactly the new tokens: no parsing, no splicing, no copy of the context, no position
  mask; the cache is reset outside the timed region before each repetition.
- ttft_ideal_dynamic_ms: the same with a ready `DynamicCache` (transformers' default), whose update
  concatenates, i.e. copies the whole context once per forward, as the engine's splice does.
- encode_ms: `add_schema` of a schema not yet added (parse, compile, encode the module, store it).
- splice_ms: copying the stored states into a request cache (`kv.cache.request_cache`, a block from the
  engine's buffer pool, as requests get) alone.
- tpot_ms: time per output token while decoding `--decode-tokens` tokens after the first.
- kv_bytes_per_token: bytes of stored keys+values per cached token.

    python benchmarks/ttft.py                       # llama/falcon/mpt bench shapes, 512..8192
    python benchmarks/ttft.py --quick               # llama, 512 and 2048, fewer repeats
    python benchmarks/ttft.py --model /path/to/ckpt --device cuda --contexts 2048,8192
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    BENCH_SHAPE,
    load_average,
    load_model,
    median,
    resolve_device,
    resolve_dtype,
    result_payload,
    sync,
    table,
    time_interleaved,
    time_ms,
    write_json,
)
from benchmarks.common import filler_text as make_filler  # noqa: E402

QUESTION = "Question: what does the document above say about the city and its hotel? Answer briefly."

COLUMNS = [("model", "model", ""), ("context_tokens", "context", "d"), ("new_tokens", "new", "d"),
           ("ttft_no_cache_ms", "no-cache ms", ".1f"), ("ttft_cache_ms", "cache ms", ".1f"),
           ("ttft_ideal_ms", "ideal ms", ".1f"), ("speedup", "speedup", ".1f"),
           ("cache_vs_ideal", "cache/ideal", ".2f"), ("ttft_ideal_dynamic_ms", "dynamic ms", ".1f"),
           ("ttft_cache_host_ms", "host-tier ms", ".1f"),
           ("splice_ms", "splice ms", ".2f"), ("encode_ms", "encode ms", ".0f"),
           ("tpot_ms", "tpot ms", ".1f"),
           ("kv_bytes_per_token", "KV B/tok", "d")]


def bench_prompt(tokenizer, context: int, name: str) -> tuple[str, str]:
    """(schema, prompt): one module of ~`context` tokens, then a short question."""
    text = make_filler(tokenizer, context)
    schema = f'<schema name="{name}"><module name="doc">{text}</module></schema>'
    return schema, f'<prompt schema="{name}"><doc/>{QUESTION}</prompt>'


def ready_cache(engine, parts, kind: str, capacity: int):
    """A transformers cache (`StaticCache` of `capacity` slots, or `DynamicCache`) holding `parts`."""
    from transformers.cache_utils import DynamicCache, StaticCache

    n = sum(len(p) for p in parts)
    cache = StaticCache(config=engine.model.config, max_cache_len=capacity) if kind == "static" else DynamicCache()
    for i in range(parts[0].num_layers):
        keys = torch.cat([p.keys[i] for p in parts], dim=2).to(engine.device)
        values = torch.cat([p.values[i] for p in parts], dim=2).to(engine.device)
        if kind == "static":
            layer = cache.layers[i]
            layer.lazy_initialization(keys, values)
            layer.keys[:, :, :n].copy_(keys)
            layer.values[:, :, :n].copy_(values)
            layer.cumulative_length.fill_(n)
        else:
            cache.update(keys, values, i)
    return cache


def ideal_setup(engine, prompt: str, kind: str = "static"):
    """(run, reset, out, plan): a bare model forward over the prompt's new tokens with a ready cache.

    kind="static": transformers' `StaticCache`, preallocated for exactly the prefix plus the new
    tokens and already holding the prefix states; the forward writes only the new tokens (no
    O(context) work outside attention): the floor for any prefix cache. kind="dynamic": a ready
    `DynamicCache`, transformers' default, whose update concatenates (copies) the whole context.
    """
    request = engine.plan(prompt)
    plan = request.tokens
    assert plan.positions == tuple(range(len(plan.token_ids))), "bench prompts select every module in order"
    parts = engine.modules.checkout(request.schema, plan.cached).states
    n_cached = sum(len(p) for p in parts)
    assert n_cached == plan.cached_token_count and plan.new_positions[0] == n_cached
    cache = ready_cache(engine, parts, kind, n_cached + len(plan.new_token_ids))
    ids = torch.tensor([plan.new_token_ids], dtype=torch.long, device=engine.device)
    pos = torch.tensor([plan.new_positions], dtype=torch.long, device=engine.device)
    out = {}

    @torch.inference_mode()
    def run():
        out["logits"] = engine.model(input_ids=ids, position_ids=pos, use_cache=True, logits_to_keep=1,
                                     **{engine.adapter.cache_arg: cache}).logits

    def reset():  # forget the new tokens the last run wrote (crop takes a negative count in v5)
        if kind == "static":
            for layer in cache.layers:
                layer.cumulative_length.fill_(n_cached)
        elif extra := cache.get_seq_length() - n_cached:
            cache.crop(-extra)

    return run, reset, out, plan


def splice_setup(engine, prompt: str):
    """A closure that splices the prompt's stored states into a request cache."""
    from promptcache.kv.cache import request_cache

    request = engine.plan(prompt)
    parts = engine.modules.checkout(request.schema, request.tokens.cached).states
    capacity = request.capacity(1)
    kv_heads, head_dim = engine.adapter.kv_geometry

    def spliced():  # as a request does: a block from the engine's pool, given back when done
        cache = request_cache(parts, capacity, num_layers=engine.adapter.num_layers, kv_heads=kv_heads,
                              head_dim=head_dim, device=engine.device, dtype=engine.adapter.dtype, pool=engine.pool)
        engine.pool.give(cache.block)

    return spliced


def host_engine(engine, schema: str, name: str):
    """An engine on the same model whose store holds the schema's states in host memory only.

    NOTE: its store is filled with the states `engine` already encoded (same keys: same model, same
    schema), so its add_schema finds them all and encodes nothing.
    """
    from promptcache.engine.engine import Engine

    hosted = Engine(engine.model, engine.tokenizer, chat_format=engine.chat_format, device_budget_bytes=0,
                    prefix_cache=False, progress=False)
    version = engine.modules.current(name)
    for path in version.cacheable():
        hosted.store.put(version.key(path), engine.module_states(name, path))
    hosted.add_schema(schema)
    return hosted


def measure(engine, tokenizer, model_label: str, context: int, args) -> dict:
    name = f"ttft{context}"
    schema, prompt = bench_prompt(tokenizer, context, name)
    dev, rep = engine.device, args.repeat
    def forget():  # each timed add_schema encodes the module afresh (a re-add of stored states is a no-op)
        if name in engine.schemas:
            engine.remove_schema(name)

    encode = time_ms(lambda: engine.add_schema(schema), dev, repeat=max(1, rep // 2), setup=forget)

    def first(cache: bool):
        return lambda: engine.generate(prompt, max_new_tokens=1, enable_cache=cache, ignore_eos=True)

    run, reset, out, plan = ideal_setup(engine, prompt)
    run_dyn, reset_dyn, out_dyn, _ = ideal_setup(engine, prompt, "dynamic")
    hosted = host_engine(engine, schema, name)
    assert hosted.module_tier(name, "doc") == "host"

    def on_host():
        hosted.generate(prompt, max_new_tokens=1, ignore_eos=True)

    times = time_interleaved({"no_cache": first(False), "cache": first(True), "host": on_host,
                              "ideal": (run, reset), "dynamic": (run_dyn, reset_dyn),
                              "splice": splice_setup(engine, prompt)}, dev, repeat=rep)
    # Sanity: the ideal computes what the engine's cached prefill computes.
    with engine.prefill(engine.plan(prompt)) as pre:
        reference = pre.logits
    ideal_err = max(float((o["logits"][0, -1].float() - reference.float()).abs().max()) for o in (out, out_dyn))
    tpot = []
    for _ in range(max(1, rep // 2) + 1):
        c = engine.generate(prompt, max_new_tokens=args.decode_tokens + 1, ignore_eos=True)
        assert not c.usage.response_cached, "timings must not come from the response cache"
        tpot.append((c.usage.total_s - c.usage.ttft_s) * 1e3 / max(1, c.usage.output_tokens - 1))
    sync(dev)
    stored = engine.module_states(name, "doc")
    engine.remove_schema(name)  # free this context's states before the next
    row = {"model": model_label, "device": str(dev), "context_tokens": plan.cached_token_count,
           "new_tokens": len(plan.new_token_ids), "ttft_no_cache_ms": median(times["no_cache"]),
           "ttft_cache_ms": median(times["cache"]), "ttft_ideal_ms": median(times["ideal"])}
    row["speedup"] = row["ttft_no_cache_ms"] / row["ttft_cache_ms"]
    row["cache_vs_ideal"] = row["ttft_cache_ms"] / row["ttft_ideal_ms"]
    row.update(encode_ms=median(encode), splice_ms=median(times["splice"]), tpot_ms=median(tpot[1:]),
               kv_bytes_per_token=stored.nbytes // len(stored), ttft_cache_host_ms=median(times["host"]),
               ttft_ideal_dynamic_ms=median(times["dynamic"]),
               ideal_max_abs_logit_diff=ideal_err, repeat=rep)
    return row


def run_model(name: str, args, device, dtype) -> list[dict]:
    from promptcache.engine.engine import Engine

    shape = {"hidden_size": args.hidden_size, "num_layers": args.layers}
    model, tok, label = load_model(name, device, dtype, max_positions=max(args.contexts) + 256, shape=shape)
    engine = Engine(model, tok, progress=False)
    rows = []
    for context in args.contexts:
        row = measure(engine, tok, label, context, args)
        print(table([row], COLUMNS).splitlines()[-1] if rows else table([row], COLUMNS), flush=True)
        rows.append(row)
    del engine, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def plot(rows: list[dict], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("matplotlib is not installed: skipping the plot (pip install matplotlib)")
        return None
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, m in zip(axes[0], models, strict=True):
        mine = sorted((r for r in rows if r["model"] == m), key=lambda r: r["context_tokens"])
        x = [r["context_tokens"] for r in mine]
        for key, label in (("ttft_no_cache_ms", "no cache"), ("ttft_cache_ms", "cache (device)"),
                           ("ttft_cache_host_ms", "cache (host tier)"), ("ttft_ideal_ms", "ideal")):
            ax.plot(x, [r[key] for r in mine], marker="o", label=label)
        ax.set(xscale="log", yscale="log", xlabel="cached context tokens", ylabel="TTFT (ms)", title=m)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xticks(x, [str(v) for v in x])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"TTFT vs context ({rows[0]['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="llama,falcon,mpt", help="built-in bench shapes (comma-separated)")
    p.add_argument("--model", help="a local checkpoint directory (overrides --models)")
    p.add_argument("--hidden-size", type=int, default=BENCH_SHAPE["hidden_size"], help="built-in model width")
    p.add_argument("--layers", type=int, default=BENCH_SHAPE["num_layers"], help="built-in model depth")
    p.add_argument("--contexts", default="512,1024,2048,4096,8192", help="context lengths in tokens")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="auto", help="auto (float32 on cpu, bfloat16 on cuda), float32, ...")
    p.add_argument("--repeat", type=int, default=5, help="timed repetitions per setting (median taken)")
    p.add_argument("--decode-tokens", type=int, default=16, help="tokens decoded for time per output token")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="2 repeats; llama, contexts 512,2048 unless given")
    p.add_argument("--out", default="benchmarks/results", help="directory for ttft.json and ttft.png")
    p.add_argument("--name", default="ttft", help="file stem of the outputs")
    args = p.parse_args(argv)
    if args.quick:
        args.repeat = min(args.repeat, 2)
        if args.models == p.get_default("models"):
            args.models = "llama"
        args.decode_tokens = min(args.decode_tokens, 4)
        if args.contexts == p.get_default("contexts"):
            args.contexts = "512,2048"
    args.contexts = [int(c) for c in args.contexts.split(",")]
    args.models = [args.model] if args.model else [m.strip() for m in args.models.split(",") if m.strip()]
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    load_start = load_average()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    torch.manual_seed(0)
    rows = []
    for name in args.models:
        rows += run_model(name, args, device, dtype)
    print()
    print(table(rows, COLUMNS))
    payload = result_payload("ttft", device, dtype, load_start, argv, rows)
    path = write_json(args.out, f"{args.name}.json", payload)
    png = plot(rows, Path(args.out) / f"{args.name}.png")
    print(f"\nwrote {path}" + (f" and {png}" if png else ""))
    return rows


if __name__ == "__main__":
    main()
