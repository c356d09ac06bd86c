"""Parse + validation work is linear in the document, for every shape of input (issue 27, finding 2).

Wall-clock time on a shared 2-core machine is noise, so work is counted instead, deterministically:

- every Python-level call and builtin call the parse makes (`sys.setprofile` events), and
- lxml's attribute lookups, which happen in C where no profiler sees them: lxml finds a value by
  walking the element's attribute list from the start, so the model charges k steps per lookup by
  name on an element with k attributes (`items()`/`values()`: k lookups, k^2 steps). Elements come
  from a parser whose element class charges them (lxml's public element-class lookup).

A shape is linear when doubling its units from 2k to 4k adds about twice the work that going from
k to 2k added (a constant offset cancels): the test allows 2.5x, where quadratic work gives 4x.
`benchmarks/parse.py` times the same shapes up to the size limits.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import pytest
from lxml import etree

from benchmarks.parse import SHAPES, Shape
from promptcache.errors import PromptCacheError


@dataclass
class Work:
    """Steps counted while a parse runs (reset by `measure`)."""

    steps: int = 0


WORK = Work()


def charge(n: int) -> None:
    WORK.steps += n


class CountedAttrib(Mapping):
    """An element's attributes, charging lxml's lookup cost per the model above."""

    def __init__(self, el: etree._Element):
        self._real = etree.ElementBase.attrib.__get__(el)

    def __getitem__(self, key: str) -> str:
        charge(len(self._real))
        return self._real[key]

    def __iter__(self) -> Iterator[str]:
        charge(len(self._real))
        return iter(self._real)

    def __len__(self) -> int:
        return len(self._real)

    def items(self):
        charge(len(self._real) ** 2)
        return self._real.items()

    def values(self):
        charge(len(self._real) ** 2)
        return self._real.values()


class CountedElement(etree.ElementBase):
    @property
    def attrib(self) -> CountedAttrib:
        return CountedAttrib(self)

    def get(self, key, default=None):
        charge(len(etree.ElementBase.attrib.__get__(self)))
        return super().get(key, default)

    def items(self):
        return self.attrib.items()

    def values(self):
        return self.attrib.values()


@pytest.fixture
def counted_parser(monkeypatch):
    """lxml parsers built by promptcache make `CountedElement`s."""
    real = etree.XMLParser

    def parser(*args, **kwargs):
        p = real(*args, **kwargs)
        p.set_element_class_lookup(etree.ElementDefaultClassLookup(element=CountedElement))
        return p

    monkeypatch.setattr(etree, "XMLParser", parser)


def measure(shape: Shape, k: int) -> int:
    """Steps of parsing `shape` with k units (a refusal counts as a parse)."""
    text = shape.make(k)

    def profile(frame, event, arg):
        if event in ("call", "c_call"):
            WORK.steps += 1

    WORK.steps = 0
    sys.setprofile(profile)
    try:
        shape.parse(text)
    except PromptCacheError:
        pass
    finally:
        sys.setprofile(None)
    return WORK.steps


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_parse_work_is_linear_in_the_input(shape: Shape, counted_parser):
    k = 4 if "nesting" in shape.name else 150  # nesting units are 60 elements each
    w1, w2, w4 = (measure(shape, n) for n in (k, 2 * k, 4 * k))
    # NOTE: + 50: a shape parsed wholly in C (a long attribute value) costs the same few steps at any size
    assert w4 - w2 <= 2.5 * (w2 - w1) + 50, f"{shape.name}: {w1}, {w2}, {w4} steps for {k}, {2 * k}, {4 * k} units"


def test_the_counter_sees_lxml_lookups(counted_parser):
    """The cost model itself: reading k values by name is k^2 steps (what the old parse paid)."""
    el = etree.fromstring("<m " + " ".join(f'a{i}="v"' for i in range(50)) + "/>", etree.XMLParser())
    WORK.steps = 0
    el.attrib.items()
    assert WORK.steps == 50 * 50
