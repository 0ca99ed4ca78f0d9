"""A catalog file's prices: its tables `price`, `prices`, `token_prices` and `megapixel_price`, and the
`CatalogModel` fields they make. Apart from `catalog_file`, which reads and checks the other keys."""

from decimal import Decimal

from pydantic import BaseModel, ConfigDict, Field

from qubax.routing.models import MegapixelPrice, Price, TokenPrices


class PriceEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    usd: Decimal = Field(ge=0)
    quality: str | None = None  # left out: any
    size: str | None = None


class TokenPricesEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text_input: Decimal = Field(ge=0)
    image_input: Decimal = Field(ge=0)
    image_output: Decimal = Field(ge=0)
    text_output: Decimal | None = Field(default=None, ge=0)  # text and thinking out, where billed apart (Gemini)


class MegapixelPriceEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    first: Decimal = Field(ge=0)  # the output's first megapixel
    further: Decimal = Field(ge=0)  # each further megapixel of the output, and each of an input image


def price_changes(
    price: Decimal | None,
    prices: list[PriceEntry] | None,
    token_prices: TokenPricesEntry | None,
    megapixel_price: MegapixelPriceEntry | None,
) -> dict[str, object]:
    """The `CatalogModel` price fields an entry sets (`price` and `prices` are not both given)."""
    changes: dict[str, object] = {}
    if price is not None:
        changes["prices"] = (Price(price),)
    if prices is not None:
        changes["prices"] = tuple(Price(entry.usd, entry.quality, entry.size) for entry in prices)
    if token_prices is not None:
        changes["token_prices"] = TokenPrices(**token_prices.model_dump())
    if megapixel_price is not None:
        changes["megapixel_price"] = MegapixelPrice(megapixel_price.first, megapixel_price.further)
        # A megapixel's price is the one `qubax models` shows and the check for a price per quality reads.
        changes.setdefault("prices", (Price(megapixel_price.first),))
    elif "prices" in changes:
        changes["megapixel_price"] = None  # a price per image replaces the megapixel one of a `like` model
    return changes
