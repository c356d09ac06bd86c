"""The inventory itself: items by SKU, stock movements, and JSON persistence."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from inventory.models import Item, StockError


@dataclass(frozen=True)
class Movement:
    """One change of stock: positive `delta` for deliveries, negative for sales."""

    sku: str
    delta: int
    reason: str = ""


class Inventory:
    """Items indexed by SKU, with a journal of every stock movement."""

    def __init__(self, items: Iterable[Item] = ()) -> None:
        self._items: dict[str, Item] = {}
        self.journal: list[Movement] = []
        for item in items:
            self.add(item)

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Item]:
        return iter(sorted(self._items.values(), key=lambda item: item.sku))

    def __contains__(self, sku: object) -> bool:
        return sku in self._items

    def get(self, sku: str) -> Item:
        try:
            return self._items[sku]
        except KeyError:
            raise StockError(f"unknown SKU {sku!r}") from None

    def add(self, item: Item) -> None:
        if item.sku in self._items:
            raise StockError(f"duplicate SKU {item.sku!r}")
        self._items[item.sku] = item

    def move(self, sku: str, delta: int, reason: str = "") -> Item:
        """Apply a stock movement; refuses to go below zero.

        Raises:
            StockError: unknown SKU, or `delta` would leave fewer than 0 units.
        """
        item = self.get(sku)
        if item.quantity + delta < 0:
            raise StockError(f"{sku}: only {item.quantity} left, cannot remove {-delta}")
        item.quantity += delta
        self.journal.append(Movement(sku, delta, reason))
        return item

    def sell(self, sku: str, units: int = 1) -> Item:
        if units <= 0:
            raise StockError(f"units must be > 0, got {units}")
        return self.move(sku, -units, "sale")

    def restock(self, sku: str, units: int) -> Item:
        if units <= 0:
            raise StockError(f"units must be > 0, got {units}")
        return self.move(sku, units, "delivery")

    def select(self, predicate: Callable[[Item], bool]) -> list[Item]:
        """Items (sorted by SKU) for which `predicate` holds."""
        return [item for item in self if predicate(item)]

    def low_stock(self, threshold: int = 5) -> list[Item]:
        return self.select(lambda item: item.is_low(threshold))

    def total_value(self) -> Decimal:
        return sum((item.value for item in self._items.values()), Decimal(0))

    def sales_by_sku(self) -> dict[str, int]:
        """Units sold per SKU, from the journal (only SKUs with sales appear)."""
        sold: dict[str, int] = {}
        for movement in self.journal:
            if movement.reason == "sale" and movement.delta < 0:
                sold[movement.sku] = sold.get(movement.sku, 0) - movement.delta
        return sold

    def save(self, path: Path) -> None:
        records = [item.to_dict() for item in self]
        path.write_text(json.dumps(records, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> Inventory:
        records = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(records, list):
            raise StockError(f"{path}: expected a JSON list of items")
        return cls(Item.from_dict(record) for record in records)
