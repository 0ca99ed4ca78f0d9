"""The admin API over real HTTP: keys made, limited and revoked through it take effect for the official SDK."""

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from pydantic import SecretStr, ValidationError

from qubax.app import create_app
from qubax.limits.quota import ADMIN_FAILURES
from qubax.records import db, tables
from qubax.server.settings import Settings
from tests.conftest import create_key
from tests.server import serve
from tests.stack import client

TOKEN = "adm_0123456789abcdefghijklmnopqrstuvwxyz"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The shared settings, with the admin API enabled."""
    settings.admin_token = SecretStr(TOKEN)
    return settings


@pytest.fixture
def admin(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{base_url}/admin", headers={"authorization": f"Bearer {TOKEN}"}) as http:
        yield http


def error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    return body


def new_key(admin: httpx.Client, **body: Any) -> dict[str, Any]:
    response = admin.post("/keys", json={"test": True, **body})
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def generate(sdk: openai.OpenAI, model: str = "flux-1-schnell", n: int = 1) -> openai.types.ImagesResponse:
    return sdk.images.generate(model=model, prompt="p", n=n, size="256x256", response_format="b64_json")


# access


def test_without_an_admin_token_the_admin_api_does_not_exist(settings: Settings) -> None:
    with serve(create_app(settings.model_copy(update={"admin_token": None}))) as url:
        for method, path in [
            ("GET", "/admin/keys"),
            ("POST", "/admin/keys"),
            ("PUT", "/admin/keys"),
            ("GET", "/admin/usage"),
            ("GET", "/metrics"),
        ]:
            response = httpx.request(method, url + path, headers={"authorization": f"Bearer {TOKEN}"})
            body = error(response, 404)
            assert body["type"] == "invalid_request_error"
            assert "turns them on by setting QUBAX_ADMIN_TOKEN" in body["message"]


def test_an_empty_admin_token_does_not_enable_it(settings: Settings) -> None:
    with serve(create_app(settings.model_copy(update={"admin_token": SecretStr("")}))) as url:
        error(httpx.get(url + "/admin/keys", headers={"authorization": "Bearer"}), 404)
        error(httpx.get(url + "/admin/keys"), 404)


def test_wrong_tokens_and_api_keys_are_refused(base_url: str, settings: Settings) -> None:
    live, test = create_key(settings), create_key(settings, test=True)
    for header in [None, "Bearer wrong", f"Bearer {TOKEN}x", f"Basic {TOKEN}", f"Bearer {live}", f"Bearer {test}"]:
        headers = {} if header is None else {"authorization": header}
        response = httpx.get(f"{base_url}/admin/keys", headers=headers)
        body = error(response, 401)
        assert body["code"] == "invalid_api_key"
        assert "admin token" in body["message"]
        assert TOKEN not in response.text and live not in response.text
    error(httpx.post(f"{base_url}/admin/keys", json={}, headers={"authorization": f"Bearer {live}"}), 401)


def test_an_address_that_keeps_failing_is_held_off_even_with_the_right_token(
    base_url: str, admin: httpx.Client
) -> None:
    for _ in range(ADMIN_FAILURES.amount):
        error(httpx.get(f"{base_url}/admin/keys", headers={"authorization": "Bearer guess"}), 401)

    for response in (
        httpx.get(f"{base_url}/admin/keys", headers={"authorization": "Bearer guess"}),
        admin.get("/keys"),
    ):
        body = error(response, 429)
        assert body["code"] == "rate_limit_exceeded" and "failed admin attempts" in body["message"]
        assert 1 <= int(response.headers["retry-after"]) <= 60
    # API keys are not held off by somebody guessing the admin token.
    assert httpx.get(f"{base_url}/v1/models", headers={"authorization": "Bearer nope"}).status_code == 401


def test_the_right_token_counts_no_failure(admin: httpx.Client) -> None:
    for _ in range(ADMIN_FAILURES.amount + 5):
        assert admin.get("/keys").status_code == 200


# keys


def test_create_list_and_retrieve(admin: httpx.Client) -> None:
    created = new_key(admin, name="ci", rpm=5, images_per_day=100, monthly_budget_usd=1.5)
    secret = created.pop("key")
    assert secret.startswith("qbx_test_") and created["prefix"] == secret[:13]
    assert created["id"].startswith("key_") and created["object"] == "api_key"
    assert created | {"created_at": 0} == {
        "object": "api_key",
        "id": created["id"],
        "name": "ci",
        "prefix": secret[:13],
        "test": True,
        "created_at": 0,
        "revoked_at": None,
        "rpm": 5,
        "images_per_day": 100,
        "max_concurrent": None,
        "monthly_budget_usd": 1.5,
    }
    assert abs(created["created_at"] - datetime.now(UTC).timestamp()) < 3600
    live = admin.post("/keys", json={})  # an empty body is a live key without a name or limits
    assert live.status_code == 201 and live.json()["key"].startswith("qbx_live_") and live.json()["name"] == ""

    listing = admin.get("/keys")
    assert listing.status_code == 200
    assert listing.json()["object"] == "list"
    assert [key["id"] for key in listing.json()["data"]] == [created["id"], live.json()["id"]]
    assert listing.json()["data"][0] == created
    assert secret not in listing.text and "digest" not in listing.text and '"key"' not in listing.text
    assert admin.get(f"/keys/{created['id']}").json() == created
    assert error(admin.get("/keys/key_nope"), 404)["code"] == "not_found"


def test_a_created_key_works_with_the_sdk(base_url: str, admin: httpx.Client) -> None:
    sdk = client(base_url, new_key(admin)["key"])
    assert len(generate(sdk, n=2).data) == 2


def test_create_rejects_bad_input(admin: httpx.Client) -> None:
    assert error(admin.post("/keys", json={"rpm": 1, "scopes": []}), 400)["code"] == "unknown_parameter"
    assert error(admin.post("/keys", json={"test": "yes"}), 400)["param"] == "test"
    assert error(admin.post("/keys", content=b"{"), 400)["code"] == "invalid_json"
    assert error(admin.post("/keys", json=[]), 400)["code"] == "invalid_json"
    assert admin.get("/keys").json()["data"] == []


def test_limits_set_with_patch_apply_at_once(base_url: str, admin: httpx.Client) -> None:
    key = new_key(admin)
    sdk = client(base_url, key["key"])
    generate(sdk)  # looked up, and so cached, without limits
    patched = admin.patch(f"/keys/{key['id']}", json={"rpm": 1, "monthly_budget_usd": 2.5})
    assert patched.status_code == 200, patched.text
    assert (patched.json()["rpm"], patched.json()["monthly_budget_usd"]) == (1, 2.5)
    generate(sdk)
    with pytest.raises(openai.RateLimitError) as caught:
        generate(sdk)
    assert (caught.value.status_code, caught.value.code) == (429, "rate_limit_exceeded")

    cleared = admin.patch(f"/keys/{key['id']}", json={"rpm": None, "monthly_budget_usd": 0}).json()
    assert (cleared["rpm"], cleared["monthly_budget_usd"]) == (None, None)
    generate(sdk)
    assert admin.patch(f"/keys/{key['id']}", json={}).json() == cleared


def test_patch_rejects_bad_input(admin: httpx.Client) -> None:
    key_id = new_key(admin, rpm=3)["id"]
    unknown = error(admin.patch(f"/keys/{key_id}", json={"rpm": 1, "name": "x"}), 400)
    assert (unknown["code"], unknown["param"]) == ("unknown_parameter", "name")
    wrong_type = error(admin.patch(f"/keys/{key_id}", json={"rpm": "5"}), 400)
    assert (wrong_type["code"], wrong_type["param"], wrong_type["type"]) == (
        "invalid_type",
        "rpm",
        "invalid_request_error",
    )
    assert error(admin.patch(f"/keys/{key_id}", json={"max_concurrent": -1}), 400)["param"] == "max_concurrent"
    assert error(admin.patch(f"/keys/{key_id}", json={"images_per_day": 2**40}), 400)["param"] == "images_per_day"
    assert error(admin.patch(f"/keys/{key_id}", content=b"rpm=1"), 400)["code"] == "invalid_json"
    assert error(admin.patch("/keys/key_nope", json={"rpm": 1}), 404)["code"] == "not_found"
    assert admin.get(f"/keys/{key_id}").json()["rpm"] == 3


@pytest.mark.parametrize("revoke", ["POST", "DELETE"])
def test_revoked_keys_are_refused_at_once(base_url: str, admin: httpx.Client, revoke: str) -> None:
    key = new_key(admin)
    sdk = client(base_url, key["key"])
    generate(sdk)
    path = f"/keys/{key['id']}/revoke" if revoke == "POST" else f"/keys/{key['id']}"
    revoked = admin.request(revoke, path)
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["id"] == key["id"] and revoked.json()["revoked_at"] is not None
    with pytest.raises(openai.AuthenticationError) as caught:
        generate(sdk)
    assert caught.value.status_code == 401
    assert admin.get(f"/keys/{key['id']}").json()["revoked_at"] == revoked.json()["revoked_at"]
    assert error(admin.request(revoke, path.replace(key["id"], "key_nope")), 404)["code"] == "not_found"


# usage


def test_usage_after_requests(base_url: str, admin: httpx.Client) -> None:
    assert admin.get("/usage").json() == {"object": "list", "data": []}
    first, second = new_key(admin, name="first"), new_key(admin, name="second")
    generate(client(base_url, first["key"]), n=2)
    generate(client(base_url, first["key"]))
    generate(client(base_url, first["key"]), model="flux-1.1-pro")
    generate(client(base_url, second["key"]))
    rows = admin.get("/usage").json()["data"]
    expected = [
        (first["id"], "first", "flux-1-schnell", 2, 3),
        (first["id"], "first", "flux-1.1-pro", 1, 1),
        (second["id"], "second", "flux-1-schnell", 1, 1),
    ]
    found = [(r["key_id"], r["key_name"], r["model"], r["requests"], r["images"]) for r in rows]
    assert sorted(found) == sorted(expected)
    assert {r["cost_usd"] for r in rows} == {0}  # test keys cost nothing
    today = datetime.now(UTC).date().isoformat()
    by_day = admin.get("/usage", params={"group_by": "day"}).json()["data"]
    assert by_day == [{"object": "usage", "day": today, "requests": 4, "images": 5, "cost_usd": 0}]


def add_generations(settings: Settings, key_id: str, rows: list[tuple[str, str, int, int]]) -> None:
    """Usage as if recorded at other times: (when, model, images, cost in micro-USD) each."""

    async def add() -> None:
        engine = db.connect(settings.resolved_database_url)
        async with db.sessions(engine)() as session:
            for when, model, images, cost in rows:
                created_at = datetime.fromisoformat(when).replace(tzinfo=UTC)
                session.add(
                    tables.Generation(
                        key_id=key_id, model=model, upstream="bfl", n=images, size="1024x1024", images=images,
                        cost_micros=cost, latency_ms=1, outcome="ok", created_at=created_at,
                    )
                )  # fmt: skip
            await session.commit()
        await engine.dispose()

    asyncio.run(add())


def test_usage_by_day_within_a_range(admin: httpx.Client, settings: Settings) -> None:
    key = new_key(admin, name="ops", test=False)
    add_generations(
        settings,
        key["id"],
        [
            ("2025-03-01 00:00:00", "flux-1.1-pro", 1, 40_000),
            ("2025-03-01 23:59:59", "flux-1.1-pro", 2, 80_000),
            ("2025-03-02 00:00:01", "flux-1-schnell", 4, 12_000),
            ("2025-03-02 12:00:00", "flux-1.1-pro", 1, 40_000),
            ("2025-03-03 00:00:00", "flux-1.1-pro", 1, 40_000),
        ],
    )

    def usage(**params: str) -> list[dict[str, Any]]:
        response = admin.get("/usage", params=params)
        assert response.status_code == 200, response.text
        rows: list[dict[str, Any]] = response.json()["data"]
        return rows

    assert usage(group_by="day", since="2025-03-01", until="2025-03-02") == [
        {"object": "usage", "day": "2025-03-01", "requests": 2, "images": 3, "cost_usd": 0.12},
        {"object": "usage", "day": "2025-03-02", "requests": 2, "images": 5, "cost_usd": 0.052},
    ]
    assert [(r["day"], r["model"], r["requests"]) for r in usage(group_by="day,model", since="2025-03-02")] == [
        ("2025-03-02", "flux-1-schnell", 1),
        ("2025-03-02", "flux-1.1-pro", 1),
        ("2025-03-03", "flux-1.1-pro", 1),
    ]
    assert usage(group_by="model,key", until="2025-03-01") == [
        {"object": "usage", "key_id": key["id"], "key_name": "ops", "model": "flux-1.1-pro", "requests": 2,
         "images": 3, "cost_usd": 0.12},
    ]  # fmt: skip
    assert usage(group_by="") == [{"object": "usage", "requests": 5, "images": 9, "cost_usd": 0.212}]
    assert usage(since="2025-04-01") == []
    assert usage(group_by="", since="1970-01-01", until="9999-12-30") == usage(group_by="")  # the widest range


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"group_by": "week"}, "group_by"),
        ({"group_by": "key,hour"}, "group_by"),
        ({"since": "2025-13-01"}, "since"),
        ({"until": "yesterday"}, "until"),
        ({"since": "2025-03-02", "until": "2025-03-01"}, "since"),
        ({"since": "0001-01-01", "until": "9999-12-31"}, "since"),
        ({"until": "9999-12-31"}, "until"),  # the day after it (where the range ends) does not exist
    ],
)
def test_usage_rejects_bad_parameters(admin: httpx.Client, params: dict[str, str], param: str) -> None:
    body = error(admin.get("/usage", params=params), 400)
    assert (body["param"], body["type"]) == (param, "invalid_request_error")


def test_a_large_monthly_budget_is_kept_exactly(admin: httpx.Client) -> None:
    created = admin.post("/keys", json={"name": "big", "monthly_budget_usd": 25000.5}).json()
    assert created["monthly_budget_usd"] == 25000.5
    assert admin.get(f"/keys/{created['id']}").json()["monthly_budget_usd"] == 25000.5


def test_a_budget_below_a_micro_dollar_is_a_budget_not_no_limit(admin: httpx.Client) -> None:
    key = new_key(admin, monthly_budget_usd=0.0000001)
    assert key["monthly_budget_usd"] == 0.000001  # the least budget stored, not 0 ("no limit")
    patched = admin.patch(f"/keys/{key['id']}", json={"monthly_budget_usd": 1e-9}).json()
    assert patched["monthly_budget_usd"] == 0.000001


def test_a_short_admin_token_stops_the_start_and_an_empty_one_leaves_the_api_off(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="at least 32 characters"):
        Settings(data_dir=tmp_path, admin_token="adm_guessable")  # type: ignore[arg-type]
    assert Settings(data_dir=tmp_path, admin_token="").admin_token is None  # type: ignore[arg-type]
    assert Settings(data_dir=tmp_path, admin_token=TOKEN[:32]).admin_token is not None  # type: ignore[arg-type]
