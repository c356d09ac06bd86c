"""Request text clean-up for response reuse, and the guards a semantic match must pass.

`normalize_text` is the documented clean-up of `Engine(response_match="normalized")`:

1. Unicode NFKC (full-width letters and digits, ligatures, compatibility forms become plain ones);
2. case folding (`str.casefold`: "Straße" and "STRASSE" are one text);
3. every run of whitespace becomes one space, leading and trailing whitespace goes;
4. trailing punctuation goes: `. , ! ? ; : …` and their CJK forms, `~`, repeated (what a question ends with
   does not change what it asks).

Nothing inside the text changes: "what's" and "what is" stay two texts (a semantic match may join them).

`guards_agree(a, b)` is what a semantic match must also pass, on the texts before clean-up:
- the same numbers (digits, with separators removed: "1,000" is "1000"; English number words count);
- the same capitalised words that are not a sentence's first word (names of people, places, products:
  "France" against "Germany"); a text in a script without case has none, so this guard cannot help there;
- both negated or neither (English "not", "n't", "never", "no", "without"; Korean 안, 않, 못, 없, 말고, 아니);
- the same units and switch words, in the same order ("5 miles to km" is not "5 km to miles", "turn on" is
  not "turn off"; `UNITS` and `SWITCHES` list them, in English and Korean, with Korean weekdays, which have
  no capitals to tell them apart);
- not the same words in another order (embeddings barely see word order: "A to B" against "B to A").

The guards trade recall for precision: a paraphrase that spells a name in lower case, or a number in
words the lists do not know, is not reused. A wrong reuse is a wrong answer; a missed one costs a prefill.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

TRAILING_PUNCTUATION = ".,!?;:…~。、！？；：．，"

_SPACE = re.compile(r"\s+")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")
_SENTENCE_END = re.compile(r"[.!?。！？]\s+")
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
_NUMBER_WORDS.update({"thirty": "30", "forty": "40", "fifty": "50", "hundred": "100", "thousand": "1000",
                      "million": "1000000", "half": "0.5", "dozen": "12"})
_NEGATION_EN = re.compile(r"\b(?:not|never|no|none|nobody|nothing|without|cannot)\b|n't\b")
_NEGATION_KO = re.compile(r"(?:^|\s)(?:안|못)\s|않|없|말고|마세요|말아|아니|아닌|아님")
UNITS = ("mile", "kilometer", "kilometre", "km", "meter", "metre", "feet", "foot", "inch", "celsius",
         "fahrenheit", "gram", "kilogram", "kg", "pound", "ounce", "liter", "litre", "gallon", "dollar", "euro",
         "yen", "won", "마일", "킬로미터", "미터", "피트", "인치", "섭씨", "화씨", "그램", "킬로그램", "파운드", "온스",
         "리터", "갤런", "달러", "유로", "엔화", "원화")
SWITCHES = ("on", "off", "enable", "disable", "buy", "sell", "cancel", "renew", "create", "delete", "켜", "끄",
            "예매", "취소", "갱신", "삭제", "월요일", "화요일", "수요일", "목요일", "금요일", "토요일", "일요일")
_UNIT_WORDS = {u: i for i, u in enumerate(UNITS)}
_SWITCH_WORDS = set(SWITCHES)


def normalize_text(text: str) -> str:
    """The clean-up above: NFKC, case folding, whitespace, trailing punctuation."""
    text = _SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()
    return text.rstrip(TRAILING_PUNCTUATION + " ")


@dataclass(frozen=True)
class Guards:
    """What two texts must share to be one request: numbers, names, negation."""

    numbers: tuple[str, ...]
    names: frozenset[str]
    negated: bool
    markers: tuple[str, ...]  # units and switch words in text order
    words: tuple[str, ...]  # the cleaned-up text's words, sorted (same words, other order: not one request)
    ordered: tuple[str, ...]


def guards_of(text: str) -> Guards:
    """The guards of a request text (before clean-up: capitals matter)."""
    text = unicodedata.normalize("NFKC", text)
    numbers = [n.replace(",", "") for n in _NUMBER.findall(text)]
    names = set()
    for sentence in _SENTENCE_END.split(text):
        words = _WORD.findall(sentence)
        numbers += [_NUMBER_WORDS[w.lower()] for w in words if w.lower() in _NUMBER_WORDS]
        names.update(w.split("'")[0] for w in words[1:] if w[0].isupper() and w != "I")
    lower = text.casefold()
    negated = bool(_NEGATION_EN.search(lower) or _NEGATION_KO.search(lower))
    words = _WORD.findall(normalize_text(text))
    return Guards(tuple(sorted(numbers)), frozenset(names), negated, _markers(words), tuple(sorted(words)),
                  tuple(words))


def _markers(words: list[str]) -> tuple[str, ...]:
    """Units and switch words, in order: English words whole (plural "s" dropped), Korean ones as prefixes
    of a word (Korean attaches particles and endings: "마일은", "켜려면")."""
    out = []
    for w in words:
        stem = w[:-1] if w.endswith("s") and w[:-1] in _UNIT_WORDS else w
        if stem in _UNIT_WORDS or stem in _SWITCH_WORDS:
            out.append(stem)
        elif not w.isascii():
            hit = next((m for m in (*UNITS, *SWITCHES) if not m.isascii() and w.startswith(m)), None)
            if hit is not None:
                out.append(hit)
    return tuple(out)


def guards_agree(a: str | Guards, b: str | Guards) -> bool:
    """Whether two request texts pass the guards of a semantic match (see the module docstring)."""
    ga = a if isinstance(a, Guards) else guards_of(a)
    gb = b if isinstance(b, Guards) else guards_of(b)
    if (ga.numbers, ga.names, ga.negated, ga.markers) != (gb.numbers, gb.names, gb.negated, gb.markers):
        return False
    return ga.words != gb.words or ga.ordered == gb.ordered
