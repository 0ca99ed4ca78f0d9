"""Model lifecycles end to end: the catalog's shutdown dates and successors, the dates OpenAI's model list
publishes (read at start and then daily, never on a request's path), retired names answered by their
successor or refused naming it, with the real `openai` SDK against the fake OpenAI."""

import logging
import re
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import openai
import pytest

from qubax.background import lifecycle as reading
from qubax.providers.registry import PROVIDERS, default_concurrency
from qubax.routing.catalog_file import CatalogError, load_catalog
from qubax.server.settings import Settings
from tests.conftest import eventually
from tests.fakes import openai as fake_openai
from tests.fakes.openai import RETIRED, FakeOpenAI
from tests.server import serve
from tests.stack import Stack, running_stack

FAR = "2099-03-01"  # a date OpenAI's list publishes for gpt-image-2 in these tests (the catalog has none)


def today() -> date:
    return datetime.now(UTC).date()


@pytest.fixture
def stack(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    monkeypatch.setitem(fake_openai.SHUTDOWN_DATES, "gpt-image-2", FAR)
    with running_stack(settings, providers=("openai",)) as stack:
        yield stack


def listed(client: openai.OpenAI) -> dict[str, Any]:
    """Each listed model's `shutdown_date` (None where the list has none)."""
    return {model.id: model.to_dict().get("shutdown_date") for model in client.models.list()}


def test_every_retired_name_is_served_by_its_successor_or_refused_naming_it(stack: Stack) -> None:
    stack.openai.retired = True  # 404 model_not_found for each, as OpenAI's own API answers
    for name in (*RETIRED, "dall-e-2"):
        try:
            raw = stack.live.images.with_raw_response.generate(model=name, prompt="a red barn")
        except openai.BadRequestError as refused:
            assert refused.param == "model", name
            assert f"`{name}` has been shut down upstream; use `gpt-image-2`" in refused.message, name
            continue
        assert raw.headers["x-qubax-route"] == "openai:gpt-image-2", name
        assert len(raw.parse().data) == 1, name
    served = {"dall-e-3", "gpt-image-1", "gpt-image-1.5", "gpt-image-1-mini"}  # tried, then made by gpt-image-2
    asked = [body["model"] for body in stack.openai.requests]
    assert asked == [model for name in RETIRED if name in served for model in (name, "gpt-image-2")]


def test_models_list_shows_the_catalogs_dates_and_else_the_upstreams(stack: Stack) -> None:
    dates = eventually(lambda: checked(listed(stack.live), "gpt-image-2", FAR))
    assert dates["dall-e-3"] == "2026-05-12" and dates["gpt-image-1"] == "2026-10-23"
    assert dates["gpt-image-1.5"] == dates["gpt-image-1-mini"] == "2026-12-01"
    assert dates["gpt-image-2.6-sunburst"] is None and dates["gpt-image-2.6-flare"] is None
    one = stack.live.models.retrieve("gpt-image-2").to_dict()
    assert (
        one["shutdown_date"] == FAR
        and "shutdown_date" not in stack.live.models.retrieve("gpt-image-2.6-flare").to_dict()
    )
    assert "imagen-4" in listed(stack.test) and listed(stack.test)["imagen-4"] == "2026-08-17"
    assert stack.openai.model_lists == 1  # read once at start: not on a request's path


def checked(dates: dict[str, Any], model: str, expected: str) -> dict[str, Any]:
    assert dates[model] == expected
    return dates


def test_an_operator_file_overrides_a_date(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(fake_openai.SHUTDOWN_DATES, "gpt-image-2", FAR)
    soon = today() + timedelta(days=10)
    catalog = f'[models."gpt-image-1.5"]\nshutdown_date = {soon}\n[models."gpt-image-2"]\nshutdown_date = 2098-01-01\n'
    with running_stack(settings, catalog=catalog, providers=("openai",)) as stack:
        dates = eventually(lambda: checked(listed(stack.live), "gpt-image-1.5", soon.isoformat()))
        assert dates["gpt-image-2"] == "2098-01-01"  # the catalog's, before the one OpenAI publishes
        assert dates["gpt-image-1-mini"] == "2026-12-01"


def test_a_model_its_upstream_no_longer_serves_without_a_stand_in_names_its_successor(settings: Settings) -> None:
    """dall-e-3 with its first route alone (the catalog file's way to do without the stand-in): a host that
    still serves it makes it; one that answers `model_not_found` is a 400 naming its successor. A model
    with no successor keeps the upstream's error."""
    catalog = (
        '[models."dall-e-3"]\nroutes = [{ provider = "openai" }]\n'
        '[models."old-image"]\nlike = "gpt-image-1"\n'
        'routes = [{ provider = "openai", model = "chatgpt-image-latest" }]\n'
    )
    with running_stack(settings, catalog=catalog, providers=("openai",)) as stack:
        assert (
            stack.live.images.with_raw_response.generate(model="dall-e-3", prompt="a fox").headers["x-qubax-route"]
            == "openai"
        )
        stack.openai.retired = True
        with pytest.raises(openai.BadRequestError) as caught:
            stack.live.images.generate(model="dall-e-3", prompt="a fox")
        assert caught.value.param == "model"
        assert "`dall-e-3` has been shut down upstream; use `gpt-image-2`" in caught.value.message
        with pytest.raises(openai.APIStatusError) as failed:
            stack.live.images.generate(model="old-image", prompt="a fox")
        assert failed.value.status_code == 502 and failed.value.code == "upstream_model_not_found"
    assert [body["model"] for body in stack.openai.requests] == ["dall-e-3"] * 2 + ["chatgpt-image-latest"]


def test_the_loop_survives_the_upstream_being_down_and_reads_it_again(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(reading, "READ_EVERY_SECONDS", 0.1)
    caplog.set_level(logging.WARNING, "qubax")
    down = FakeOpenAI()
    down.fail_status = 503
    down.shutdown_dates["gpt-image-2"] = FAR
    with (
        serve(down.app) as url,
        running_stack(settings, providers=("openai",), base_urls={"openai": url + "/v1"}) as stack,
    ):
        eventually(lambda: check_logged(caplog, "reading the shutdown dates openai publishes failed"))
        assert listed(stack.live)["gpt-image-2"] is None  # the app answers meanwhile, with the catalog's dates
        assert listed(stack.live)["gpt-image-1"] == "2026-10-23"
        down.fail_status = None
        eventually(lambda: checked(listed(stack.live), "gpt-image-2", FAR))
    assert "test-key" not in caplog.text


def check_logged(caplog: pytest.LogCaptureFixture, text: str) -> None:
    assert text in caplog.text


def test_models_made_like_another_start_with_no_lifecycle_of_their_own() -> None:
    catalog = load_catalog(None, set(PROVIDERS), default_concurrency())
    mini, two = catalog.find("gpt-image-1-mini"), catalog.find("gpt-image-2")
    assert (mini.shutdown_date, mini.successor) == (date(2026, 12, 1), "gpt-image-2")
    assert (two.shutdown_date, two.successor) == (None, None)  # made `like` gpt-image-1.5, which has both
    flare = catalog.find("gpt-image-2.6-flare")
    assert flare.token_prices is not None and flare.token_prices.image_output == 30
    assert [route.upstream_model for route in flare.routes] == ["gpt-image-2.6-flare"]


def test_a_successor_must_be_a_model_of_the_catalog(tmp_path: Any) -> None:
    path = tmp_path / "catalog.toml"
    path.write_text('[models."dall-e-3"]\nsuccessor = "dall-e-4"\n')
    with pytest.raises(CatalogError, match=re.escape("models.dall-e-3.successor: no model named 'dall-e-4'")):
        load_catalog(path, set(PROVIDERS), default_concurrency())
    path.write_text('[models."dall-e-3"]\nshutdown_date = "soon"\n')
    with pytest.raises(CatalogError, match=re.escape("models.dall-e-3.shutdown_date: Input should be a valid date")):
        load_catalog(path, set(PROVIDERS), default_concurrency())
