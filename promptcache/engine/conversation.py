"""`Conversation`: multi-turn chat where every turn reuses the states of all earlier turns."""

from __future__ import annotations

from pathlib import Path

from .usage import Completion, Usage


class Conversation:
    """Made by `Engine.chat(system=...)`. `send` appends a user turn and the model's reply.

    Turns are rendered in the engine's chat format and prefix-cached, so a turn's cached_tokens
    are at least the previous turn's input_tokens.
    """

    def __init__(self, engine, system: str | None = None, namespace: str = ""):
        self.engine, self.namespace = engine, namespace
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        self.usages: list[Usage] = []

    def send(self, text: str, **gen) -> Completion:
        """Add a user message, generate the reply (kwargs as `Engine.generate`), keep both."""
        out = self.engine.generate([*self.messages, {"role": "user", "content": text}],
                                   namespace=self.namespace, **gen)
        self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": out.text}]
        self.usages.append(out.usage)
        return out

    def usage_rows(self) -> list[dict[str, float]]:
        return [{"turn": i + 1, "input": u.input_tokens, "cache_reads": u.cached_tokens,
                 "cache_writes": u.cache_write_tokens, "output": u.output_tokens,
                 "ttft_ms": 1000 * u.ttft_s, "total_ms": 1000 * u.total_s} for i, u in enumerate(self.usages)]

    def usage_table(self) -> str:
        """A per-turn table: cache reads, writes, input, output and latency."""
        head = f"{'turn':>4} {'input':>7} {'reads':>7} {'writes':>7} {'output':>7} {'ttft ms':>9} {'total ms':>9}"
        lines = [head]
        for r in self.usage_rows():
            lines.append(f"{r['turn']:>4} {r['input']:>7} {r['cache_reads']:>7} {r['cache_writes']:>7} "
                         f"{r['output']:>7} {r['ttft_ms']:>9.1f} {r['total_ms']:>9.1f}")
        return "\n".join(lines)

    def plot_usage(self, path: str | Path) -> Path:
        """Save a PNG: cached vs computed input tokens per turn (bars) and TTFT (line). Needs matplotlib."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.usage_rows()
        turns = [r["turn"] for r in rows]
        reads = [r["cache_reads"] for r in rows]
        fresh = [r["input"] - r["cache_reads"] for r in rows]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar(turns, reads, label="cached input tokens")
        ax.bar(turns, fresh, bottom=reads, label="computed input tokens")
        ax.set_xlabel("turn")
        ax.set_ylabel("tokens")
        ax2 = ax.twinx()
        ax2.plot(turns, [r["ttft_ms"] for r in rows], "k.-", label="TTFT (ms)")
        ax2.set_ylabel("TTFT (ms)")
        ax.legend(loc="upper left")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return Path(path)
