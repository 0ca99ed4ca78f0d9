"""The models Qubax serves out of the box; the operator's catalog file (`catalog_file`) changes and adds."""

from decimal import Decimal

from qubax.catalog import CatalogModel, Fixed, Free, Grid, Price, Route, TokenPrices
from qubax.errors import MODEL_NOT_SERVED

GPT_SIZES = Fixed(("1024x1024", "1536x1024", "1024x1536"))
# OpenAI's own API has shut these down: dall-e-3 on 2026-05-12, gpt-image-1 on 2026-10-23 (its
# image-generation guide), and gpt-image-1.5 (with its snapshot gpt-image-1.5-2025-12-16),
# gpt-image-1-mini and chatgpt-image-latest on 2026-12-01 (developers.openai.com/api/docs/deprecations);
# it answers them 404 `model_not_found`. Where a host answers so, the same credential makes the image
# with SUCCESSOR, billed at its token rates: gpt-image-2, active on OpenAI's model page
# (developers.openai.com/api/docs/models/gpt-image-2, snapshot gpt-image-2-2026-04-21), whose sizes
# include every size these models take. The deprecations page recommends gpt-image-2.6-sunburst or
# gpt-image-2.6-flare ($5 text in, $8 image in, $30 image out per 1M tokens on their model pages); OpenAI
# publishes no per-image estimates for them to budget with, so an operator who wants them adds them in
# the catalog file.
SUCCESSOR = "gpt-image-2"
# Names OpenAI shut down that the catalog does not serve: a 400 naming the model to ask for instead.
SHUT_DOWN = {name: SUCCESSOR for name in ("dall-e-2", "gpt-image-1.5-2025-12-16", "chatgpt-image-latest")}


def retired(upstream_model: str) -> tuple[Route, ...]:
    """The model's own route, for hosts that still serve it, then SUCCESSOR where the host does not."""
    return (Route("openai", upstream_model), Route("openai", SUCCESSOR, only_after=MODEL_NOT_SERVED))


def gpt_image(
    model_id: str,
    created: int,
    tokens: TokenPrices,
    square: tuple[float, float, float],
    other: tuple[float, float, float],
    sizes: Fixed | Free = GPT_SIZES,
    fidelities: tuple[str, ...] = ("low", "high"),
    routes: tuple[Route, ...] = (),
) -> CatalogModel:
    """One of OpenAI's GPT image models, with per-image estimates (low, medium, high) for 1024x1024 and
    for the other sizes; its routes are OpenAI's under its own name unless given."""
    prices = [
        Price(Decimal(str(usd)), quality, size)
        for quality, square_usd, other_usd in zip(
            ("low", "medium", "high", "auto"), (*square, square[2]), (*other, other[2]), strict=True
        )
        for usd, size in ((square_usd, "1024x1024"), (other_usd, None))
    ]
    return CatalogModel(
        id=model_id,
        owned_by="openai",
        created=created,
        sizes=sizes,
        default_size="1024x1024",
        max_n=10,
        prices=tuple(prices),
        routes=routes or (Route("openai", model_id),),
        qualities=("auto", "low", "medium", "high"),
        default_quality="auto",
        max_prompt_chars=32000,
        default_response_format="b64_json",
        backgrounds=("auto", "opaque", "transparent"),
        moderations=("auto", "low"),
        compression=True,
        token_prices=tokens,
        edits=True,
        input_fidelities=fidelities,
        flux_extensions=False,
    )


FLUX_GRID = Grid(256, 1440, 32)
# Kontext and Fill are asked for an aspect ratio or make their image's size, and then fitted: any size
# on a finer grid.
EDIT_GRID = Grid(256, 1440, 16)


def kontext(model_id: str, created: int, usd: Decimal, tier: str) -> CatalogModel:
    """FLUX.1 Kontext [pro] or [max]: text to image, or an edit of up to 4 images (no mask), made at the
    size's aspect ratio (about a megapixel) and fitted to the size."""
    fal = "fal-ai/flux-pro/kontext" + ("/max" if tier == "max" else "")
    return CatalogModel(
        id=model_id,
        owned_by="black-forest-labs",
        created=created,
        sizes=EDIT_GRID,
        default_size="1024x1024",
        max_n=4,
        prices=(Price(usd),),
        routes=(
            Route("bfl", model_id),
            Route("fal", fal),
            Route("replicate", f"black-forest-labs/{model_id}", max_images=1),
        ),
        edits=True,
        max_images=4,
        mask="none",
        size_from_input=True,
    )


ULTRA_SIZES = Fixed(
    (
        "3136x1344",
        "2752x1536",
        "2496x1664",
        "2368x1792",
        "2048x2048",
        "1792x2368",
        "1664x2496",
        "1536x2752",
        "1344x3136",
    )
)

MODELS: tuple[CatalogModel, ...] = (
    CatalogModel(
        id="flux-1.1-pro",
        owned_by="black-forest-labs",
        created=1727827200,
        sizes=FLUX_GRID,
        default_size="1024x768",
        max_n=4,
        prices=(Price(Decimal("0.04")),),
        routes=(
            Route("bfl", "flux-pro-1.1"),
            Route("fal", "fal-ai/flux-pro/v1.1"),
            Route("replicate", "black-forest-labs/flux-1.1-pro"),
            Route("together", "black-forest-labs/FLUX.1.1-pro"),
        ),
    ),
    CatalogModel(
        id="flux-1.1-pro-ultra",
        owned_by="black-forest-labs",
        created=1730851200,
        sizes=ULTRA_SIZES,
        default_size="2752x1536",
        max_n=4,
        prices=(Price(Decimal("0.06")),),
        routes=(
            Route("bfl", "flux-pro-1.1-ultra"),
            Route("fal", "fal-ai/flux-pro/v1.1-ultra"),
            Route("replicate", "black-forest-labs/flux-1.1-pro-ultra"),
        ),
    ),
    CatalogModel(
        id="flux-1-schnell",
        owned_by="black-forest-labs",
        created=1722470400,
        sizes=FLUX_GRID,
        default_size="1024x1024",
        max_n=4,
        prices=(Price(Decimal("0.003")),),
        routes=(
            Route("together", "black-forest-labs/FLUX.1-schnell"),
            Route("fal", "fal-ai/flux/schnell"),
            Route("replicate", "black-forest-labs/flux-schnell"),
        ),
    ),
    kontext("flux-kontext-pro", 1748476800, Decimal("0.04"), "pro"),
    kontext("flux-kontext-max", 1748476800, Decimal("0.08"), "max"),
    CatalogModel(
        id="flux-1-fill-pro",
        owned_by="black-forest-labs",
        created=1732147200,
        sizes=EDIT_GRID,
        default_size="1024x1024",
        max_n=4,
        prices=(Price(Decimal("0.05")),),
        routes=(
            Route("bfl", "flux-pro-1.0-fill"),
            Route("fal", "fal-ai/flux-pro/v1/fill"),
            Route("replicate", "black-forest-labs/flux-fill-pro"),
        ),
        edits=True,
        generates=False,
        max_images=1,
        mask="required",
        size_from_input=True,
    ),
    CatalogModel(
        id="dall-e-3",
        owned_by="openai",
        created=1698785189,
        sizes=Fixed(("1024x1024", "1792x1024", "1024x1792")),
        default_size="1024x1024",
        max_n=1,
        prices=(
            Price(Decimal("0.04"), "standard", "1024x1024"),
            Price(Decimal("0.08"), "standard"),
            Price(Decimal("0.08"), "hd", "1024x1024"),
            Price(Decimal("0.12"), "hd"),
        ),
        # Made by SUCCESSOR where the host does not serve it (at the size asked: gpt-image-2 takes all
        # three; standard quality as medium, hd as high; no style).
        routes=retired("dall-e-3"),
        qualities=("auto", "standard", "hd"),
        default_quality="standard",
        styles=("vivid", "natural"),
        default_style="vivid",
        flux_extensions=False,
    ),
    # OpenAI bills these by token (rates from its pricing page, 2026-12); the per-image prices are its
    # published estimates for 1024x1024 and for the other sizes, `auto` counted as `high`.
    gpt_image(
        "gpt-image-1.5",
        1765843200,
        TokenPrices(Decimal(5), Decimal(8), Decimal(32)),
        (0.009, 0.034, 0.133),
        (0.013, 0.05, 0.2),
        routes=retired("gpt-image-1.5"),
    ),
    gpt_image(
        "gpt-image-1-mini",
        1759708800,
        TokenPrices(Decimal(2), Decimal("2.5"), Decimal(8)),
        (0.005, 0.011, 0.036),
        (0.006, 0.015, 0.052),
        fidelities=(),  # input_fidelity is not for the mini model
        routes=retired("gpt-image-1-mini"),
    ),
    gpt_image(
        "gpt-image-2",
        1776729600,
        TokenPrices(Decimal(5), Decimal(8), Decimal(30)),
        (0.009, 0.032, 0.125),
        (0.013, 0.048, 0.19),
        sizes=Free(step=16, max_side=3840, max_ratio=3, min_pixels=655_360, max_pixels=8_294_400),
    ),
    gpt_image(
        "gpt-image-1",
        1745539200,
        TokenPrices(Decimal(5), Decimal(10), Decimal(40)),
        (0.011, 0.042, 0.167),
        (0.016, 0.063, 0.25),
        routes=retired("gpt-image-1"),
    ),
)
