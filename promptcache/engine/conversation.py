"""`Conversation`: multi-turn chat where every turn reuses the states of all earlier turns, its answers too."""

from __future__ import annotations

from pathlib import Path

from ..errors import PromptCacheError
from .usage import Completion, Usage

PLOT_INSTALL = 'pip install "promptcache[plot]"'


class Conversation:
    """Made by `Engine.chat(system=...)`. `send` appends a user turn and the model's reply.

    Turns are rendered in the engine's chat format and prefix-cached. Each reply is fed back as the
    ids that were generated (`answers.AnswerMemory`), not as a re-tokenization of its text, so a
    turn's cached_tokens cover every earlier turn, prompts and answers: at least the previous turn's
    input_tokens plus its output_tokens, less the one token each turn computes to start its answer.
    """

    def __init__(self, engine, system: str | None = None, namespace: str = ""):
        self.engine, self.namespace = engine, namespace
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        self.usages: list[Usage] = []
        self._answers: list[tuple[str, tuple[int, ...]]] = []  # this conversation's replies and their ids

    def send(self, text: str, **gen) -> Completion:
        """Add a user message, generate the reply (kwargs as `Engine.generate`), keep both."""
        for answer, ids in self._answers:  # NOTE: the engine's memory is bounded; this conversation's is not
            self.engine.answers.remember(self.namespace, answer, ids)
        out = self.engine.generate([*self.messages, {"role": "user", "content": text}],
                                   namespace=self.namespace, **gen)
        self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": out.text}]
        self._answers.append((out.text, out.token_ids))
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

    def plot_usage(self, path: str | Path, title: str | None = None) -> Path:
        """Save a PNG of the usage per turn: tokens (input read from the cache, input computed, cache writes,
        output) as bars, time to first token and total latency as lines. Needs matplotlib
        (`pip install "promptcache[plot]"`); PromptCacheError without it."""
        plt, ticker = _pyplot()
        rows = self.usage_rows()
        turns = [r["turn"] for r in rows]
        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.27
        reads = [r["cache_reads"] for r in rows]
        computed = [r["input"] - r["cache_reads"] for r in rows]
        ax.bar([t - width for t in turns], reads, width, label="input: cache read", color="tab:green")
        ax.bar([t - width for t in turns], computed, width, bottom=reads, label="input: computed", color="tab:orange")
        ax.bar(turns, [r["cache_writes"] for r in rows], width, label="cache write", color="tab:blue")
        ax.bar([t + width for t in turns], [r["output"] for r in rows], width, label="output", color="tab:purple")
        ax.set_xlabel("turn")
        ax.set_ylabel("tokens")
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        ax.set_xticks(turns)
        ax2 = ax.twinx()
        ax2.plot(turns, [r["ttft_ms"] for r in rows], "k.-", label="time to first token")
        ax2.plot(turns, [r["total_ms"] for r in rows], "k.--", label="total latency")
        ax2.set_ylabel("latency (ms)")
        ax2.set_ylim(bottom=0)
        handles = [h for a in (ax, ax2) for h in a.get_legend_handles_labels()[0]]
        labels = [lab for a in (ax, ax2) for lab in a.get_legend_handles_labels()[1]]
        ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, fontsize="small",
                  frameon=False)
        ax.set_title(title or f"Chat usage per turn ({len(rows)} turn{'s' * (len(rows) != 1)})")
        fig.tight_layout()
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        return Path(path)


def _pyplot():
    """matplotlib's pyplot (headless) and ticker, or a PromptCacheError naming the install command."""
    try:
        import matplotlib
    except ImportError as e:
        raise PromptCacheError(f"plot_usage needs matplotlib, which is not installed; install it with: "
                               f"{PLOT_INSTALL}") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    return plt, ticker
