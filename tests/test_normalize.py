"""Request text clean-up and the guards of a semantic match."""

from __future__ import annotations

import pytest

from promptcache.normalize import guards_agree, normalize_text


@pytest.mark.parametrize("raw, clean", [
    ("  What is   the CAPITAL\tof Germany?? ", "what is the capital of germany"),
    ("ＡＢＣ　１２３。", "abc 123"),  # NFKC: full-width letters, digits and space; CJK full stop
    ("Straße!", "strasse"),  # case folding, not just lower()
    ("맛있는   파스타 레시피 알려줘~", "맛있는 파스타 레시피 알려줘"),
    ("ends with an ellipsis…", "ends with an ellipsis"),
    ("a.b is kept", "a.b is kept"),  # only trailing punctuation goes
])
def test_normalize_text(raw, clean):
    assert normalize_text(raw) == clean


@pytest.mark.parametrize("a, b, agree", [
    ("How do I reset my password?", "I forgot my password, how can I reset it?", True),
    ("What is the capital of Germany?", "What is the capital of France?", False),  # names
    ("Book a table for 2 people", "Book a table for 4 people", False),  # numbers
    ("How much is 1,000 dollars?", "How much is 1000 dollars?", True),  # separators
    ("Remind me in two hours", "Remind me in 2 hours", True),  # number words
    ("Which foods contain gluten?", "Which foods do not contain gluten?", False),  # negation
    ("잠이 올 때 뭘 하면 좋아?", "잠이 안 올 때 뭘 하면 좋아?", False),  # Korean negation
    ("해피엔딩인 이야기 들려줘", "해피엔딩이 아닌 이야기 들려줘", False),
    ("Convert 5 miles to kilometers", "Convert 5 kilometers to miles", False),  # unit order
    ("5마일은 몇 킬로미터야?", "5킬로미터는 몇 마일이야?", False),
    ("How do I turn off notifications?", "How do I turn on notifications?", False),  # switch words
    ("박물관은 월요일에 열어요?", "박물관은 일요일에 열어요?", False),  # Korean weekdays
    ("dog bites man", "man bites dog", False),  # the same words in another order
])
def test_guards(a, b, agree):
    assert guards_agree(a, b) is agree
    assert guards_agree(b, a) is agree
