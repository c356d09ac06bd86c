"""A tiny query language over items: `price < 10 & quantity >= 3 | tag = sale`.

Grammar (`&` binds tighter than `|`, no parentheses):

    query      := conjunction ("|" conjunction)*
    conjunction := comparison ("&" comparison)*
    comparison := FIELD OP VALUE
    OP         := "<" | "<=" | ">" | ">=" | "=" | "!="
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation

from inventory.models import Item, StockError

Predicate = Callable[[Item], bool]

_OPS: dict[str, Callable[[object, object], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "=": operator.eq,
    "!=": operator.ne,
}
_COMPARISON = re.compile(r"^\s*(\w+)\s*(<=|>=|!=|<|>|=)\s*(.+?)\s*$")
_NUMERIC = {"price", "quantity", "value"}


def parse_query(text: str) -> Predicate:
    """Compile `text` into a predicate on items.

    Raises:
        StockError: empty query, unknown field, bad operator or a non-numeric number.
    """
    if not text.strip():
        raise StockError("empty query")
    alternatives = [_conjunction(part) for part in text.split("|")]
    return lambda item: any(all(test(item) for test in tests) for tests in alternatives)


def _conjunction(text: str) -> list[Predicate]:
    return [_comparison(part) for part in text.split("&")]


def _comparison(text: str) -> Predicate:
    match = _COMPARISON.match(text)
    if match is None:
        raise StockError(f"cannot read comparison {text.strip()!r}; expected e.g. 'price < 10'")
    field_name, op_text, raw = match.groups()
    compare = _OPS[op_text]
    if field_name == "tag":
        if op_text not in ("=", "!="):
            raise StockError("tags only support '=' and '!='")
        return lambda item: compare(raw in item.tags, True)
    if field_name in _NUMERIC:
        try:
            number = Decimal(raw)
        except InvalidOperation:
            raise StockError(f"{field_name} needs a number, got {raw!r}") from None
        return lambda item: compare(Decimal(getattr(item, field_name)), number)
    if field_name in ("sku", "name"):
        return lambda item: compare(getattr(item, field_name), raw)
    raise StockError(f"unknown field {field_name!r}; use price, quantity, value, sku, name or tag")
