from decimal import Decimal
from pathlib import Path

import pytest

from qubax.catalog import Catalog, Fixed, Grid, Route, TokenPrices
from qubax.catalog_file import CatalogError, load_catalog
from qubax.errors import ModelNotFound
from qubax.models import MODELS

PROVIDERS = {"bfl", "fal", "replicate", "together", "openai"}
DEFAULTS = {"bfl": 24, "fal": 40}


def load(tmp_path: Path, text: str) -> Catalog:
    path = tmp_path / "catalog.toml"
    path.write_text(text)
    return load_catalog(path, PROVIDERS, DEFAULTS)


def test_no_file_means_the_built_in_catalog() -> None:
    catalog = load_catalog(None, PROVIDERS, DEFAULTS)
    assert catalog.models == MODELS
    assert catalog.concurrency == DEFAULTS


def test_reorder_routes_change_price_and_add_aliases(tmp_path: Path) -> None:
    catalog = load(
        tmp_path,
        """
        [providers.bfl]
        concurrency = 6

        [models."flux-1.1-pro"]
        price = 0.05
        aliases = ["flux-pro", "fp"]
        routes = [{ provider = "fal" }, { provider = "bfl", model = "flux-pro-1.1-beta" }]
        """,
    )
    model = catalog.find("fp")
    assert model.id == "flux-1.1-pro"
    assert model.routes == (Route("fal", "fal-ai/flux-pro/v1.1"), Route("bfl", "flux-pro-1.1-beta"))
    assert model.price(None, "1024x768") == Decimal("0.05")
    assert catalog.concurrency == {"bfl": 6, "fal": 40}
    assert [route.upstream_model for route in catalog.find("dall-e-3").routes] == ["dall-e-3", "gpt-image-2"]


def test_a_new_model_starts_from_an_existing_one(tmp_path: Path) -> None:
    catalog = load(
        tmp_path,
        """
        [models."flux-dev"]
        like = "flux-1-schnell"
        price = 0.025
        max_n = 2
        sizes = { min = 512, max = 1024, step = 64 }
        default_size = "768x768"
        routes = [{ provider = "fal", model = "fal-ai/flux/dev" }]
        """,
    )
    model = catalog.find("flux-dev")
    assert (model.id, model.max_n, model.default_size, model.aliases) == ("flux-dev", 2, "768x768", ())
    assert model.sizes == Grid(512, 1024, 64)
    assert model.routes == (Route("fal", "fal-ai/flux/dev"),)
    assert catalog.find("flux-1-schnell").max_n == 4  # the original is untouched
    fixed = load(tmp_path, '[models.sq]\nlike = "dall-e-3"\nsizes = ["512x512"]\ndefault_size = "512x512"\n')
    assert fixed.find("sq").sizes == Fixed(("512x512",))
    with pytest.raises(ModelNotFound):
        catalog.find("flux-9")


def test_a_token_billed_model_gets_new_rates(tmp_path: Path) -> None:
    text = '[models."gpt-image-1.5"]\ntoken_prices = { text_input = 4, image_input = 7.5, image_output = 30 }\n'
    model = load(tmp_path, text).find("gpt-image-1.5")
    assert model.token_prices == TokenPrices(Decimal(4), Decimal("7.5"), Decimal(30))
    assert model.prices == load_catalog(None, PROVIDERS, DEFAULTS).find("gpt-image-1.5").prices  # estimates kept


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[models", "Expected"),
        (
            '[models."flux-1.1-pro"]\nprice = -1\n',
            "models.flux-1.1-pro.price: Input should be greater than or equal to 0",
        ),
        ('[models."flux-1.1-pro"]\ncolour = "red"\n', "models.flux-1.1-pro.colour: Extra inputs are not permitted"),
        ('[models."flux-1.1-pro"]\nroutes = [{ provider = "mj" }]\n', "unknown provider 'mj' (known: bfl, fal"),
        (
            '[models."dall-e-3"]\nroutes = [{ provider = "bfl" }]\n',
            "bfl has no built-in name for this model; set `model`",
        ),
        ('[models."flux-1.1-pro"]\nroutes = []\n', "needs at least one route"),
        ("[models.new]\nprice = 1\n", "a new model needs `like"),
        ('[models.new]\nlike = "nope"\n', "models.new.like: no model named 'nope'"),
        ('[models."dall-e-3"]\ndefault_size = "512x512"\n', "default_size '512x512' is not one of its sizes"),
        ('[models."dall-e-3"]\naliases = ["flux-1-schnell"]\n', "'flux-1-schnell' is used by both"),
        ("[providers.midjourney]\nconcurrency = 3\n", "providers: unknown provider 'midjourney'"),
        ("[providers.bfl]\nconcurrency = 0\n", "providers.bfl.concurrency"),
        (
            '[models."gpt-image-2"]\ntoken_prices = { text_input = 5 }\n',
            "models.gpt-image-2.token_prices.image_input: Field required",
        ),
    ],
)
def test_mistakes_are_reported_with_where_and_why(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(CatalogError) as caught:
        load(tmp_path, text)
    assert str(caught.value).startswith(f"QUBAX_CATALOG {tmp_path / 'catalog.toml'}: ")
    assert message in str(caught.value)


def test_a_missing_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="No such file"):
        load_catalog(tmp_path / "nope.toml", PROVIDERS, DEFAULTS)
