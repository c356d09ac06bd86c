"""A Bedrock-style conversation manager against `promptcache serve`, through boto3's bedrock-runtime client.

It does what Bedrock users do with prompt caching: the system prompt and the last two user turns carry
a `cachePoint`, so each turn reads what the turn before it kept and keeps its own. After the chat it
prints one row per turn (latency, cache read, cache write, input, output tokens) and a bar chart of
where each turn's prompt came from.

    promptcache serve --model smollm2-135m-instruct --port 8000 &
    python examples/converse_cache.py --url http://127.0.0.1:8000 --model smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import boto3
from botocore.config import Config

SYSTEM = ("You are a patient travel agent. You plan trips across Europe by train, you know the timetables, "
          "the prices and the best seats, and you answer in two or three short sentences. ") * 4
QUESTIONS = ["I want to go from Paris to Vienna. Which trains?", "How long does it take?",
             "Is there a sleeper?", "What does a couchette cost?", "Can I stop in Munich on the way?"]


@dataclass(frozen=True)
class Turn:
    latency_ms: float
    read: int
    write: int
    input: int
    output: int


class Conversation:
    """A multi-turn chat whose system prompt and last two user turns are cache points."""

    def __init__(self, client, model: str, system: str, max_tokens: int):
        self.client, self.model, self.max_tokens = client, model, max_tokens
        self.system = [{"text": system}, {"cachePoint": {"type": "default"}}]
        self.messages: list[dict] = []

    def ask(self, question: str) -> tuple[str, Turn]:
        self.messages.append({"role": "user", "content": [{"text": question}]})
        t0 = time.perf_counter()
        out = self.client.converse(modelId=self.model, system=self.system, messages=self._marked(),
                                   inferenceConfig={"maxTokens": self.max_tokens, "temperature": 0})
        latency = (time.perf_counter() - t0) * 1000
        answer = out["output"]["message"]["content"][0]["text"]
        self.messages.append({"role": "assistant", "content": [{"text": answer}]})
        u = out["usage"]
        return answer, Turn(latency, u["cacheReadInputTokens"], u["cacheWriteInputTokens"], u["inputTokens"],
                            u["outputTokens"])

    def _marked(self) -> list[dict]:
        """The messages with a cachePoint after each of the last two user turns (and none elsewhere)."""
        users = [i for i, m in enumerate(self.messages) if m["role"] == "user"][-2:]
        return [{"role": m["role"], "content": m["content"] + ([{"cachePoint": {"type": "default"}}] if i in users
                                                                 else [])} for i, m in enumerate(self.messages)]


def table(turns: list[Turn]) -> str:
    lines = [f"{'turn':>4} {'latency ms':>10} {'cache read':>10} {'cache write':>11} {'input':>6} {'output':>6}"]
    lines += [f"{i:>4} {t.latency_ms:>10.0f} {t.read:>10} {t.write:>11} {t.input:>6} {t.output:>6}"
              for i, t in enumerate(turns, 1)]
    return "\n".join(lines)


def chart(turns: list[Turn], width: int = 60) -> str:
    """One bar per turn: R cache read, W cache write, I input (prompt tokens after them), O output."""
    most = max(t.read + t.write + t.input + t.output for t in turns) or 1
    lines = ["prompt tokens per turn: R cache read, W cache write, I input, O output"]
    for i, t in enumerate(turns, 1):
        bar = "".join(c * round(n * width / most) for c, n in (("R", t.read), ("W", t.write), ("I", t.input),
                                                                 ("O", t.output)))
        lines.append(f"{i:>4} |{bar}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default: %(default)s)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="the served model id (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--turns", type=int, default=len(QUESTIONS), choices=range(1, len(QUESTIONS) + 1))
    args = p.parse_args()
    client = boto3.client("bedrock-runtime", endpoint_url=args.url, region_name="us-east-1",
                          aws_access_key_id="local", aws_secret_access_key="local",
                          config=Config(retries={"max_attempts": 1}, read_timeout=600))
    chat = Conversation(client, args.model, SYSTEM, args.max_tokens)
    turns = []
    for question in QUESTIONS[: args.turns]:
        answer, turn = chat.ask(question)
        turns.append(turn)
        print(f"> {question}\n{answer}\n")
    print(table(turns))
    print()
    print(chart(turns))


if __name__ == "__main__":
    main()
