"""Streamed text equals `generate()`'s text, multi-byte stop strings included (issue 27, finding 4:
`stop=["🌟🌟"]` streamed '🌟' where `generate()` returned '').

The model is scripted: a forward hook on its output embeddings makes each greedy pick the next token
of a fixed text's tokens, so a test chooses exactly what is generated (emoji split into byte
tokens by SmolLM2's byte-level BPE, byte-fallback pieces with the tiny SentencePiece tokenizer).
"""

from __future__ import annotations

import promptcache as pc

SCRIPT = "Hi 🌟🌟 there, naïve café 日本 🙂!"
STOPS = ["🌟🌟", "🌟", "🌟 t", "i 🌟", "🌟🌟 there", "é", "ï", "日本", "本 🙂", "🙂!", "!", "Hi", "café 日", "x"]


class Script:
    """Greedy picks follow `ids`: the i-th logits computed for a request favour ids[i]."""

    def __init__(self, engine, ids: list[int]):
        engine.generate("Hi", max_new_tokens=1)  # the first request also runs a probe forward
        self.ids, self.step = ids, 0
        self._hook = engine.model.get_output_embeddings().register_forward_hook(self._force)

    def _force(self, module, args, out):
        out = out.clone()
        out[..., -1, :] = 0.0
        out[..., -1, self.ids[min(self.step, len(self.ids) - 1)]] = 100.0
        self.step += 1
        return out

    def restart(self) -> None:
        self.step = 0

    def close(self) -> None:
        self._hook.remove()


def texts(engine, script: Script, stop: list[str]) -> tuple[str, str]:
    """(generate()'s text, the concatenated stream) for the scripted answer under `stop`."""
    kw = {"max_new_tokens": len(script.ids), "stop": stop, "ignore_eos": True, "enable_cache": False}
    script.restart()
    whole = engine.generate("Say it.", **kw).text
    script.restart()
    streamed = "".join(chunk.text for chunk in engine.stream("Say it.", **kw))
    return whole, streamed


def check_every_stop(engine) -> None:
    ids = list(engine.tokenizer.encode(SCRIPT, add_special_tokens=False))
    script = Script(engine, ids)
    try:
        whole, streamed = texts(engine, script, [])
        assert streamed == whole == SCRIPT  # the script is followed
        for stop in STOPS:
            whole, streamed = texts(engine, script, [stop])
            assert streamed == whole, f"stop={stop!r}: streamed {streamed!r}, generate() returned {whole!r}"
            assert stop not in whole
        whole, streamed = texts(engine, script, ["🌟🌟"])
        assert whole.strip() == "Hi"
    finally:
        script.close()


def test_streamed_text_equals_generate_with_multibyte_stops_tiny():
    model, tok = pc.testing.tiny_model("llama")
    check_every_stop(pc.Engine(model, tok, progress=False))


def test_streamed_text_equals_generate_with_multibyte_stops_smollm2(smollm2):
    check_every_stop(pc.Engine(smollm2.model, smollm2.tokenizer, progress=False))

