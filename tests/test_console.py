"""The operator console over HTTP: who gets in, what protects its forms, and what its pages show.
(`test_console_browser.py` drives it in a real browser.)"""

import asyncio
import csv
import io
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import openai
import pytest
from pydantic import SecretStr
from sqlalchemy import update
from starlette.requests import Request
from starlette.responses import Response

from qubax.console import sessions
from qubax.records import db, tables
from qubax.server.settings import Settings
from tests.conftest import eventually
from tests.stack import Stack, rows, running_stack
from tests.test_admin import TOKEN
from tests.test_upstreams import picture


@pytest.fixture
def stack(settings: Settings) -> Iterator[Stack]:
    settings.admin_token = SecretStr(TOKEN)
    with running_stack(settings, providers=("bfl",)) as stack:
        yield stack


def browser(stack: Stack) -> httpx.Client:
    """A client that behaves as a browser on the console's pages: it sends its own origin with forms."""
    return httpx.Client(base_url=stack.url, headers={"origin": stack.url}, follow_redirects=False)


def signed_in(stack: Stack) -> tuple[httpx.Client, str]:
    """A browser signed in, and the CSRF token its pages carry."""
    client = browser(stack)
    answer = client.post("/console/sign-in", data={"token": TOKEN})
    assert answer.status_code == 303 and answer.headers["location"] == "/console"
    return client, csrf_of(client.get("/console").text)


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert found is not None
    return found[1]


def test_pages_without_a_session_lead_to_sign_in(stack: Stack) -> None:
    client = browser(stack)
    for path in ("/console", "/console/keys", "/console/usage", "/console/playground", "/console/jobs"):
        answer = client.get(path)
        assert answer.status_code == 303 and answer.headers["location"] == "/console/sign-in", path
    for path in ("/console/keys", "/console/sign-out", "/console/playground"):
        answer = client.post(path, data={"csrf_token": "x"})
        assert answer.status_code == 401 and answer.json()["error"]["code"] == "no_session"
    page = client.get("/console/sign-in")
    assert page.status_code == 200 and 'name="token"' in page.text


def test_sign_in_sets_a_strict_session_cookie_and_sign_out_ends_it(stack: Stack) -> None:
    client = browser(stack)
    answer = client.post("/console/sign-in", data={"token": TOKEN})
    cookie = answer.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/console" in cookie
    assert "Max-Age=28800" in cookie and "Secure" not in cookie  # plain http here; Secure over https
    [session] = rows(stack.settings, tables.ConsoleSession)
    assert session.digest not in cookie  # the cookie's token is stored as a digest only
    assert client.get("/console").status_code == 200
    csrf = csrf_of(client.get("/console").text)
    out = client.post("/console/sign-out", data={"csrf_token": csrf})
    assert out.status_code == 303 and 'qubax_console=""' in out.headers["set-cookie"]
    assert rows(stack.settings, tables.ConsoleSession) == []
    assert client.get("/console").status_code == 303


def test_wrong_tokens_and_api_keys_cannot_sign_in(stack: Stack) -> None:
    client = browser(stack)
    for token in ("wrong", stack.live_key, stack.test.api_key, ""):
        answer = client.post("/console/sign-in", data={"token": token})
        assert answer.status_code in (401, 422 if not token else 401)
        assert "set-cookie" not in answer.headers
    assert "Sign-in failed." in client.post("/console/sign-in", data={"token": "wrong"}).text
    assert rows(stack.settings, tables.ConsoleSession) == []


def test_forms_need_the_csrf_token_and_our_own_origin(stack: Stack) -> None:
    client, csrf = signed_in(stack)
    without = client.post("/console/keys", data={"name": "x"})
    assert without.status_code == 403 and without.json()["error"]["code"] == "csrf"
    forged = client.post("/console/keys", data={"name": "x", "csrf_token": "forged"})
    assert forged.status_code == 403
    elsewhere = client.post(
        "/console/keys", data={"name": "x", "csrf_token": csrf}, headers={"origin": "https://evil.example"}
    )
    assert elsewhere.status_code == 403 and elsewhere.json()["error"]["code"] == "cross_origin"
    no_origin = httpx.post(f"{stack.url}/console/keys", data={"name": "x", "csrf_token": csrf}, cookies=client.cookies)
    assert no_origin.status_code == 403
    assert len(rows(stack.settings, tables.ApiKey)) == 2  # none of them made a key
    assert client.post("/console/keys", data={"name": "ok", "csrf_token": csrf}).status_code == 200
    assert len(rows(stack.settings, tables.ApiKey)) == 3


def test_pages_carry_a_strict_content_security_policy_and_never_the_token(stack: Stack) -> None:
    client, _ = signed_in(stack)
    pages = ["/console", "/console/keys", "/console/usage", "/console/playground", "/console/jobs", "/console/sign-in"]
    for path in pages:
        answer = client.get(path)
        assert answer.status_code == 200, path
        policy = answer.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
        assert "unsafe-inline" not in policy
        assert TOKEN not in answer.text and "<script>" not in answer.text, path
    assert TOKEN not in client.post("/console/sign-in", data={"token": TOKEN}).text


def test_keys_are_created_limited_and_revoked(stack: Stack) -> None:
    client, csrf = signed_in(stack)
    form = {"csrf_token": csrf, "name": "mobile app", "kind": "live", "rpm": "60", "monthly_budget_usd": "12.5"}
    created = client.post("/console/keys", data=form)
    secret = re.search(r'id="new-secret">(qbx_live_[^<]+)<', created.text)
    assert secret is not None
    assert secret[1] not in client.get("/console/keys").text  # shown once
    key = next(row for row in rows(stack.settings, tables.ApiKey) if row.name == "mobile app")
    assert (key.rpm, key.monthly_budget_micros, key.test) == (60, 12_500_000, False)
    changed = client.post(
        f"/console/keys/{key.id}/limits", data={"csrf_token": csrf, "monthly_budget_usd": "20", "rpm": ""}
    )
    assert changed.status_code == 303
    key = next(row for row in rows(stack.settings, tables.ApiKey) if row.name == "mobile app")
    assert (key.rpm, key.monthly_budget_micros) == (None, 20_000_000)
    assert "$0.00 of $20.00" in client.get("/console/keys").text
    assert client.post(f"/console/keys/{key.id}/revoke", data={"csrf_token": csrf}).status_code == 303
    assert httpx.get(f"{stack.url}/v1/models", headers={"authorization": f"Bearer {secret[1]}"}).status_code == 401


def test_the_playground_makes_images_under_the_chosen_key(stack: Stack) -> None:
    client, csrf = signed_in(stack)
    test_key = next(row for row in rows(stack.settings, tables.ApiKey) if row.test)
    form = {"csrf_token": csrf, "key_id": test_key.id, "model": "flux-1.1-pro", "prompt": "a fox", "n": "2"}
    page = client.post("/console/playground", data=form, timeout=30)
    assert page.status_code == 200
    assert page.text.count('src="data:image/png;base64,') == 2
    assert 'data-figure="route">test<' in page.text
    [generation] = rows(stack.settings, tables.Generation)
    assert (generation.key_id, generation.images, generation.cost_micros) == (test_key.id, 2, 0)
    refused = client.post("/console/playground", data=form | {"n": "9"}, timeout=30)
    assert 'role="alert"' in refused.text and "got n=9." in refused.text


def test_usage_csv_matches_the_admin_api(stack: Stack) -> None:
    stack.test.images.generate(model="flux-1.1-pro", prompt="a fox", n=2)
    stack.live.images.generate(model="flux-1.1-pro", prompt="a fox")
    client, _ = signed_in(stack)
    download = client.get("/console/usage.csv")
    assert download.headers["content-type"].startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(download.text)))
    admin = httpx.get(
        f"{stack.url}/admin/usage", params={"group_by": "day,key,model"}, headers={"authorization": f"Bearer {TOKEN}"}
    ).json()["data"]
    assert [(r["key_id"], r["model"], int(r["images"]), float(r["cost_usd"])) for r in table] == [
        (r["key_id"], r["model"], r["images"], r["cost_usd"]) for r in admin
    ]
    only_live = client.get("/console/usage.csv", params={"key": stack_live_id(stack)}).text
    assert len(list(csv.DictReader(io.StringIO(only_live)))) == 1
    assert "flux-1.1-pro" in client.get("/console").text


def stack_live_id(stack: Stack) -> str:
    return next(row.id for row in rows(stack.settings, tables.ApiKey) if not row.test)


def test_the_console_is_off_without_an_admin_token(settings: Settings) -> None:
    with running_stack(settings, providers=("bfl",)) as stack:
        answer = httpx.get(f"{stack.url}/console")
    assert answer.status_code == 404 and "QUBAX_ADMIN_TOKEN" in answer.json()["error"]["message"]


def test_bad_limits_are_shown_on_the_form(stack: Stack) -> None:
    client, csrf = signed_in(stack)
    refused = client.post("/console/keys", data={"csrf_token": csrf, "name": "x", "rpm": "-3"})
    assert refused.status_code == 400 and "Requests per minute must be between 0 and" in refused.text
    key_id = stack_live_id(stack)
    refused = client.post(f"/console/keys/{key_id}/limits", data={"csrf_token": csrf, "monthly_budget_usd": "lots"})
    assert refused.status_code == 400 and "Monthly budget must be a number" in refused.text
    assert len(rows(stack.settings, tables.ApiKey)) == 2


def test_an_expired_session_signs_out(stack: Stack) -> None:
    client, _ = signed_in(stack)

    async def expire() -> None:
        engine = db.connect(stack.settings.resolved_database_url)
        async with db.sessions(engine)() as session:
            await session.execute(update(tables.ConsoleSession).values(expires_at=tables.now() - timedelta(seconds=1)))
            await session.commit()
        await engine.dispose()

    asyncio.run(expire())
    assert client.get("/console").headers["location"] == "/console/sign-in"


def test_the_cookie_is_secure_over_https() -> None:
    request = Request({"type": "http", "scheme": "https", "server": ("q.example", 443), "path": "/", "headers": []})
    response = Response()
    sessions.set_cookie(response, request, "token")
    assert "Secure" in response.headers["set-cookie"]


def test_an_edit_in_the_playground(stack: Stack) -> None:
    client, csrf = signed_in(stack)
    test_key = next(row for row in rows(stack.settings, tables.ApiKey) if row.test)
    form = {"csrf_token": csrf, "key_id": test_key.id, "model": "flux-kontext-pro", "prompt": "make it blue"}
    files = {"image": ("red.png", picture(64, 48), "image/png")}
    page = client.post("/console/playground", data=form, files=files, timeout=30)
    assert page.status_code == 200 and page.text.count('src="data:image/png;base64,') == 1, page.text[-800:]
    [generation] = rows(stack.settings, tables.Generation)
    assert (generation.model, generation.images) == ("flux-kontext-pro", 1)


def test_the_playground_streams_its_images_then_a_summary(stack: Stack) -> None:
    client, csrf = signed_in(stack)
    test_key = next(row for row in rows(stack.settings, tables.ApiKey) if row.test)
    form = {"key_id": test_key.id, "model": "flux-1.1-pro", "prompt": "a fox", "n": "2"}
    answer = client.post("/console/playground/stream", data=form, headers={"x-csrf-token": csrf}, timeout=30)
    assert answer.headers["content-type"].startswith("text/event-stream")
    names = re.findall(r"^event: (.+)$", answer.text, re.MULTILINE)
    assert names == ["image_generation.completed", "image_generation.completed", "qubax.summary"]
    summary = json.loads(answer.text.rsplit("data: ", 1)[1])
    assert summary["route"] == "test" and summary["cost"] == "$0.00"
    refused = client.post("/console/playground/stream", data=form | {"n": "9"}, headers={"x-csrf-token": csrf})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "n"
    assert client.post("/console/playground/stream", data=form).status_code == 403  # no CSRF token


def test_the_overview_shows_a_failing_route_and_its_breaker(settings: Settings) -> None:
    settings.admin_token = SecretStr(TOKEN)
    with running_stack(settings, providers=("bfl",), breaker_failures=1) as stack:
        stack.bfl.submit_status = 500
        with pytest.raises(openai.APIStatusError):
            stack.live.images.generate(model="flux-1.1-pro", prompt="a fox")
        client, _ = signed_in(stack)
        page = client.get("/console").text
    row = re.search(r"<tr>\s*<td>flux-1.1-pro</td>\s*<td>bfl.*?</tr>", page, re.DOTALL)
    assert row is not None and "breaker open" in row[0] and "Black Forest Labs" in row[0]
    assert "100.0%" in page  # today's error rate
    assert "not configured" in page and "set FAL_KEY" in page


def test_the_overview_warns_of_shutdowns_and_of_routes_whose_upstream_lost_the_model(settings: Settings) -> None:
    """Within 30 days or past (the catalog's date and the one OpenAI's model list publishes, side by side),
    and a route whose upstream answered `model_not_found`."""
    settings.admin_token = SecretStr(TOKEN)
    soon, later = (datetime.now(UTC).date() + timedelta(days=days) for days in (10, 100))
    catalog = f'[models."gpt-image-1.5"]\nshutdown_date = {soon}\n[models."gpt-image-2"]\nshutdown_date = {later}\n'
    with running_stack(settings, catalog=catalog, providers=("openai",)) as stack:
        stack.openai.retired = True
        stack.live.images.generate(model="gpt-image-1", prompt="a fox")  # made by gpt-image-2 after a 404
        eventually(lambda: read_once(stack))
        client, _ = signed_in(stack)
        page = client.get("/console").text
    lifecycle = page[page.index('id="lifecycle"') : page.index("Routes now")]
    rows = {row[0]: row for row in re.findall(r"<tr>\s*<td>([^<]+)</td>(.*?)</tr>", lifecycle, re.DOTALL)}
    assert rows.keys() >= {"gpt-image-1.5", "gpt-image-2", "dall-e-3"}
    assert f"{soon}" in lifecycle and "in 10 days" in lifecycle and "the catalog" in lifecycle
    assert "2026-12-01" in lifecycle and "openai (its model list)" in lifecycle  # OpenAI's own date, beside
    assert f"{later}" in rows["gpt-image-2"][1] and "data-warning" not in rows["gpt-image-2"][1]
    assert 'data-warning="dall-e-3"' in lifecycle and "shut down" in rows["dall-e-3"][1]
    assert re.search(r'data-not-found="openai:gpt-image-1".*answered 1 time in', lifecycle, re.DOTALL)


def read_once(stack: Stack) -> None:
    assert stack.openai.model_lists == 1  # OpenAI's model list, read as the app started


def test_usage_with_bad_days_says_so_on_the_page(stack: Stack) -> None:
    client, _ = signed_in(stack)
    page = client.get("/console/usage", params={"since": "2026-13-01"})
    assert page.status_code == 400 and "Days are written YYYY-MM-DD." in page.text


@pytest.mark.parametrize(
    ("params", "param"),
    [({"since": "0001-01-01", "until": "9999-12-31"}, "since"), ({"until": "9999-12-31"}, "until")],
)
def test_usage_with_days_out_of_range_is_a_400(stack: Stack, params: dict[str, str], param: str) -> None:
    """Not an OverflowError (the day after 9999-12-31): the page says which day, the CSV names it."""
    client, _ = signed_in(stack)
    page = client.get("/console/usage", params=params)
    assert page.status_code == 400 and f"Invalid value for &#39;{param}&#39;" in page.text
    download = client.get("/console/usage.csv", params=params)
    assert download.status_code == 400 and download.json()["error"]["param"] == param


def test_usage_over_the_widest_range_has_no_chart(stack: Stack) -> None:
    stack.live.images.generate(model="flux-1.1-pro", prompt="a fox")
    client, _ = signed_in(stack)
    page = client.get("/console/usage", params={"since": "1970-01-01", "until": "9999-12-30"})
    assert page.status_code == 200 and "flux-1.1-pro" in page.text and "Images per day" not in page.text
    download = client.get("/console/usage.csv", params={"since": "1970-01-01", "until": "9999-12-30"})
    assert download.status_code == 200 and len(list(csv.DictReader(io.StringIO(download.text)))) == 1
