"""TextTracker decodes incrementally: its text is every prefix's full decode, for a fraction of the work."""

from __future__ import annotations

import functools
import random

import pytest

import promptcache as pc
from promptcache.engine.generate import TextTracker

CORPUS = ["The city has a hotel by the water. ", "Prices: 3 € per day, 5 £ per night; naïve café déjà vu. ",
          "def f(x):\n    return x < 3 and x > 1\n", "日本語のテキストと emoji 🙂 mixed in. "]


@functools.cache
def byte_level_tokenizer():
    """A GPT-2-style byte-level BPE tokenizer (like SmolLM2's), trained offline on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>")


TOKENIZERS = {"sentencepiece": pc.testing.tiny_tokenizer, "byte-level": byte_level_tokenizer}


class Counting:
    """A tokenizer wrapper counting the ids passed to `decode`."""

    def __init__(self, tok):
        self.tok, self.decoded = tok, 0

    def decode(self, ids, **kw):
        self.decoded += len(ids)
        return self.tok.decode(ids, **kw)

    def convert_ids_to_tokens(self, i):
        return self.tok.convert_ids_to_tokens(i)


def realistic_ids(tok, n: int) -> list[int]:
    text = "".join(CORPUS)
    ids = tok(text, add_special_tokens=False).input_ids
    return (ids * (n // len(ids) + 1))[:n]


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("kind", ["text", "random"])
def test_text_is_the_full_decode_after_every_token(name, kind):
    tok = TOKENIZERS[name]()
    rng = random.Random(0)
    ids = realistic_ids(tok, 300) if kind == "text" else [rng.randrange(len(tok)) for _ in range(300)]
    tracker = TextTracker(tok, ())
    for k, i in enumerate(ids, 1):
        tracker.add(i)
        assert tracker.text == tok.decode(ids[:k], skip_special_tokens=True), f"after {k} tokens"
    tracker.finish()
    assert tracker.text == tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("name", TOKENIZERS)
def test_decoding_work_grows_linearly(name):
    tok = Counting(TOKENIZERS[name]())
    n = 1000
    tracker = TextTracker(tok, ())
    for i in realistic_ids(tok.tok, n):
        tracker.add(i)
    tracker.finish()
    # a full decode per token would be n * (n + 1) / 2 = 500,500 ids
    assert tok.decoded <= 100 * n


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("stop", [("hotel",), ("€ per", "x > 1\n"), ("🙂",)])
def test_streamed_deltas_add_up_and_stop_strings_cut(name, stop):
    tok = TOKENIZERS[name]()
    ids = realistic_ids(tok, 200)[7:]
    tracker, streamed = TextTracker(tok, stop), ""
    for i in ids:
        tracker.add(i)
        streamed += tracker.delta(final=False)
        if tracker.stopped:
            break
    tracker.finish()
    streamed += tracker.delta(final=True)
    assert streamed == tracker.text
    full = tok.decode(ids, skip_special_tokens=True)
    cut = min(i for i in (full.find(s) for s in stop) if i >= 0)
    assert tracker.stopped and tracker.text == full[:cut]


@pytest.mark.parametrize("name", TOKENIZERS)
def test_any_stop_string_cuts_at_its_first_occurrence(name):
    tok = TOKENIZERS[name]()
    ids = realistic_ids(tok, 400)
    full = tok.decode(ids, skip_special_tokens=True)
    rng = random.Random(1)
    for _ in range(40):  # substrings of the late text: some straddle where the decoded window starts
        at = rng.randrange(len(full) // 2, len(full) - 8)
        stop = (full[at:at + rng.randint(2, 8)],)
        tracker = TextTracker(tok, stop)
        for i in ids:
            tracker.add(i)
            tracker.delta(final=False)
            if tracker.stopped:
                break
        assert tracker.stopped and tracker.text == full[: full.find(stop[0])], stop


def test_finish_repairs_a_disagreeing_text():
    tok = pc.testing.tiny_tokenizer()
    ids = realistic_ids(tok, 50)
    tracker = TextTracker(tok, ())
    for i in ids:
        tracker.add(i)
    tracker.text = tracker.text[:-3] + "???"  # as if a tokenizer's joining rules had reached further back
    tracker.finish()
    assert tracker.text == tok.decode(ids, skip_special_tokens=True)
