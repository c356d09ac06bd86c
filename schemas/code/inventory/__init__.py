"""inventory: a small stock-keeping library (the codegen example's code base)."""

from inventory.models import Item, StockError
from inventory.query import parse_query
from inventory.report import render_html
from inventory.store import Inventory

__all__ = ["Inventory", "Item", "StockError", "parse_query", "render_html"]
