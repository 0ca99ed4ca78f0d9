import re
import tomllib
from decimal import Decimal
from importlib import resources
from pathlib import Path

import pytest

from qubax.errors import InvalidRequest, ModelNotFound
from qubax.protocol import ImageGenerateRequest
from qubax.providers.registry import PROVIDERS as REGISTRY
from qubax.routing import catalog_file
from qubax.routing.catalog import Catalog
from qubax.routing.catalog_file import CatalogError, load_catalog
from qubax.routing.models import Fixed, Grid, Route, TokenPrices
from tests.catalog import MODELS

PROVIDERS = {"bfl", "fal", "replicate", "together", "openai", "byteplus", "google"}
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


def test_a_megapixel_price_bills_by_size_and_a_price_per_image_replaces_it(tmp_path: Path) -> None:
    catalog = load(
        tmp_path,
        """
        [models."flux-2-pro"]
        megapixel_price = { first = 0.04, further = 0.02 }

        [models."flat-flux"]
        like = "flux-2-pro"
        price = 0.05
        """,
    )
    model = catalog.find("flux-2-pro")
    assert [model.price(None, size) for size in ("1024x1024", "1440x816", "2048x2048")] == [
        Decimal("0.04"), Decimal("0.06"), Decimal("0.10")
    ]  # fmt: skip
    assert model.price(None, "1024x1024", ((300, 200), (2048, 1024))) == Decimal("0.10")  # 1 + 2 input megapixels
    flat = catalog.find("flat-flux")
    assert flat.megapixel_price is None and flat.price(None, "2048x2048") == Decimal("0.05")
    with pytest.raises(CatalogError, match=r"models.flux-2-pro.megapixel_price.first: Input should be greater"):
        load(tmp_path, '[models."flux-2-pro"]\nmegapixel_price = { first = -1, further = 0 }\n')


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
        ('[models."flux-1.1-pro"]\nroutes = [{ provider = "mj" }]\n', "unknown provider 'mj' (known: bfl, byteplus"),
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


def test_one_loader_reads_the_built_in_file_then_the_operators_over_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_read, read = catalog_file.read, []

    def spy(label: str, path: Path, base: Catalog, providers: set[str]) -> Catalog:
        read.append((label, path))
        return real_read(label, path, base, providers)

    monkeypatch.setattr(catalog_file, "read", spy)
    catalog = load(
        tmp_path,
        """
        [models."flux-1.1-pro"]
        price = 0.05
        routes = [{ provider = "together" }, { provider = "bfl", model = "flux-pro-1.1-beta" }]

        [models."dall-e-3"]
        prices = [{ usd = 0.05, quality = "hd" }, { usd = 0.03 }]

        [models."my-flux"]                 # new, from scratch, in the keys the built-in file uses
        owned_by = "black-forest-labs"
        created = 1763942400
        sizes = { min = 256, max = 2048, step = 16 }
        default_size = "1024x1024"
        max_n = 4
        price = 0.03
        routes = [{ provider = "bfl", model = "flux-2-pro" }]
        edits = true
        max_images = 8

        [shut_down]
        "flux-1-pro" = "flux-1.1-pro"
        """,
    )
    assert read == [("built-in catalog", catalog_file.BUILTIN), ("QUBAX_CATALOG", tmp_path / "catalog.toml")]
    pro = catalog.find("flux-1.1-pro")
    assert pro.price(None, "1024x768") == Decimal("0.05")
    assert pro.routes == (Route("together", "black-forest-labs/FLUX.1.1-pro"), Route("bfl", "flux-pro-1.1-beta"))
    dalle = catalog.find("dall-e-3")
    assert (dalle.price("hd", "1024x1792"), dalle.price("standard", "1024x1024")) == (Decimal("0.05"), Decimal("0.03"))
    assert [model.id for model in catalog.models] == [model.id for model in MODELS] + ["my-flux"]
    new = catalog.find("my-flux")
    assert (new.sizes, new.edits, new.max_images, new.mask) == (Grid(256, 2048, 16), True, 8, "optional")
    untouched = [model for model in MODELS if model.id not in ("flux-1.1-pro", "dall-e-3")]
    assert [model for model in catalog.models if model in untouched] == untouched
    assert catalog.shut_down["dall-e-2"] == "gpt-image-2"  # the built-in names stay shut down beside the new one
    with pytest.raises(InvalidRequest, match=re.escape("use `flux-1.1-pro`")):
        catalog.asked("flux-1-pro")


def test_the_built_in_file_is_checked_by_the_operators_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built_in = tmp_path / "built_in.toml"
    built_in.write_text('[models.sq]\nlike = "nothing"\n')
    monkeypatch.setattr(catalog_file, "BUILTIN", built_in)
    with pytest.raises(CatalogError) as caught:
        load_catalog(None, PROVIDERS, DEFAULTS)
    assert str(caught.value) == f"built-in catalog {built_in}: models.sq.like: no model named 'nothing'"


def test_the_shipped_catalog_parses_and_each_model_has_what_the_service_needs() -> None:
    text = (resources.files("qubax.routing") / "builtin_catalog.toml").read_text()
    listed = list(tomllib.loads(text)["models"])
    catalog = load_catalog(None, set(REGISTRY), {})
    assert [model.id for model in catalog.models] == listed
    assert len(listed) == len(set(listed)) >= 11
    for model in catalog.models:
        assert model.owned_by and model.created > 0 and (model.generates or model.edits), model.id
        assert model.routes and {route.provider for route in model.routes} <= set(REGISTRY), model.id
        sizes = model.sizes.sizes if isinstance(model.sizes, Fixed) else (model.default_size,)
        for quality in set(model.qualities) - {"auto"} | {model.default_quality}:
            assert all(model.price(quality, size) > 0 for size in sizes), (model.id, quality)
        request = catalog.check(ImageGenerateRequest(model=model.id, prompt="a fox"), edit=not model.generates)
        assert request.size == model.default_size and request.cost_per_image > 0
    assert {"dall-e-2", "chatgpt-image-latest"} <= set(catalog.shut_down)
    assert set(catalog.shut_down.values()) <= set(listed)
    for table in text.split("\n[models.")[1:]:  # each price says where it came from
        if re.search(r"^(price|prices|token_prices|megapixel_price) =", table, re.MULTILINE):
            assert "\n# Price: " in table, table.splitlines()[0]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[models."dall-e-3"]\nprice = 1\nprices = [{ usd = 1 }]\n', "give `price` or `prices`, not both"),
        ('[models."dall-e-3"]\nprices = [{ usd = 1, size = "1024x1024" }]\n', "prices: none applies to quality"),
        ('[models."dall-e-3"]\ndefault_quality = "ultra"\n', "default_quality 'ultra' is not one of its qualities"),
        ('[models."dall-e-3"]\nmask = "maybe"\n', "models.dall-e-3.mask: Input should be 'optional', 'none' or"),
        (
            '[models."dall-e-3"]\nroutes = [{ provider = "openai", only_after = "timeout" }]\n',
            "models.dall-e-3.routes.0.only_after: the one case is 'upstream_model_not_found'",
        ),
        ('[models.new]\nowned_by = "me"\ncreated = 1\n', "(missing: sizes, default_size, max_n, prices, routes)"),
        ('[shut_down]\n"dall-e-2" = "dall-e-4"\n', "shut_down.dall-e-2: no model named 'dall-e-4'"),
    ],
)
def test_mistakes_in_the_keys_the_built_in_file_uses(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(CatalogError, match=re.escape(message)):
        load(tmp_path, text)
