"""Items kept in stock, and the error raised when stock rules are broken."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal


class StockError(ValueError):
    """Raised when an operation would break a stock rule (negative quantity, unknown SKU)."""


@dataclass
class Item:
    """One stock-keeping unit.

    Attributes:
        sku: unique identifier, e.g. "BOLT-M6-40".
        name: human-readable name; may contain characters such as "&" or "<".
        price: unit price in the shop's currency.
        quantity: units on hand, never negative.
        tags: free-form labels used by queries ("hardware", "sale").
    """

    sku: str
    name: str
    price: Decimal
    quantity: int = 0
    tags: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        if not self.sku or self.sku != self.sku.strip():
            raise StockError(f"invalid SKU {self.sku!r}")
        if self.price < 0:
            raise StockError(f"{self.sku}: price must be >= 0, got {self.price}")
        if self.quantity < 0:
            raise StockError(f"{self.sku}: quantity must be >= 0, got {self.quantity}")
        self.price = Decimal(self.price)

    @property
    def value(self) -> Decimal:
        """Stock value of this item: price times quantity."""
        return self.price * self.quantity

    def is_low(self, threshold: int) -> bool:
        """True when fewer than `threshold` units are left (but some may remain)."""
        return 0 <= self.quantity < threshold

    def to_dict(self) -> dict[str, object]:
        return {
            "sku": self.sku,
            "name": self.name,
            "price": str(self.price),
            "quantity": self.quantity,
            "tags": sorted(self.tags),
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Item:
        try:
            return cls(
                sku=str(data["sku"]),
                name=str(data["name"]),
                price=Decimal(str(data["price"])),
                quantity=int(data.get("quantity", 0)),  # type: ignore[arg-type]
                tags=set(data.get("tags", ())),  # type: ignore[arg-type]
            )
        except KeyError as missing:
            raise StockError(f"item record lacks field {missing}") from None
