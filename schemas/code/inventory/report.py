"""Stock reports as HTML tables, escaped so that names like "Nuts & <Bolts>" stay literal."""

from __future__ import annotations

from collections.abc import Iterable
from html import escape

from inventory.models import Item

_ROW = "<tr class=\"{cls}\"><td>{sku}</td><td>{name}</td><td>{qty}</td><td>{price}</td></tr>"


def render_html(items: Iterable[Item], *, title: str = "Stock", low_threshold: int = 5) -> str:
    """An HTML page with one row per item; low-stock rows get class="low".

    Every user-supplied string goes through `html.escape`, so "&" becomes "&amp;" and
    "<" becomes "&lt;" in the output.
    """
    rows = [_row(item, low_threshold) for item in items]
    body = "\n".join(rows) if rows else "<tr><td colspan=\"4\">no items</td></tr>"
    return (
        "<!DOCTYPE html>\n"
        f"<html><head><meta charset=\"utf-8\"><title>{escape(title)}</title></head>\n"
        f"<body><h1>{escape(title)}</h1>\n"
        "<table>\n<tr><th>SKU</th><th>Name</th><th>Qty</th><th>Price</th></tr>\n"
        f"{body}\n</table></body></html>\n"
    )


def _row(item: Item, low_threshold: int) -> str:
    cls = "low" if item.is_low(low_threshold) else "ok"
    return _ROW.format(
        cls=cls,
        sku=escape(item.sku),
        name=escape(item.name),
        qty=item.quantity,
        price=f"{item.price:.2f}",
    )


def render_text(items: Iterable[Item]) -> str:
    """A plain-text table for terminals: SKU, quantity and value, widest SKU first column."""
    items = list(items)
    width = max((len(item.sku) for item in items), default=3)
    lines = [f"{'SKU':<{width}}  {'QTY':>5}  {'VALUE':>10}"]
    lines += [f"{item.sku:<{width}}  {item.quantity:>5}  {item.value:>10.2f}" for item in items]
    return "\n".join(lines) + "\n"
