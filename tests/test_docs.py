"""The API's documentation: /openapi.json says what the API really does, /docs works offline, the admin
API's schema is for the admin token only."""

import shutil
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from qubax.app import create_app
from qubax.server.settings import Settings
from tests.server import serve

TOKEN = "admin-token-for-tests-0123456789abcdef"
ERROR_STATUSES = ("400", "401", "404", "413", "429", "500", "502", "503", "504")


@pytest.fixture
def schema(base_url: str) -> dict[str, Any]:
    response = httpx.get(f"{base_url}/openapi.json")
    assert response.status_code == 200
    document: dict[str, Any] = response.json()
    return document


def resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if ref is None:
        return node
    found: dict[str, Any] = schema
    for part in ref.removeprefix("#/").split("/"):
        found = found[part]
    return found


def test_generations_are_documented_with_their_body_answer_and_errors(schema: dict[str, Any]) -> None:
    operation = schema["paths"]["/v1/images/generations"]["post"]
    body = resolve(schema, operation["requestBody"]["content"]["application/json"]["schema"])
    assert {"model", "prompt", "n", "size", "response_format", "quality", "style", "user"} <= set(body["properties"])
    gpt = {"output_format", "output_compression", "background", "moderation", "stream", "partial_images"}
    assert gpt <= set(body["properties"])  # the GPT image models' parameters
    assert {"seed", "safety_tolerance"} <= set(body["properties"])  # the FLUX extensions
    assert set(body["required"]) == {"model", "prompt"}
    assert body["additionalProperties"] is False  # unknown fields are a 400
    answer = resolve(schema, operation["responses"]["200"]["content"]["application/json"]["schema"])
    assert set(answer["properties"]) == {"created", "data", "background", "output_format", "quality", "size", "usage"}
    assert set(answer["required"]) == {"created", "data"}
    image = resolve(schema, answer["properties"]["data"]["items"])
    assert set(image["properties"]) == {"url", "b64_json", "revised_prompt"}
    for status in ERROR_STATUSES:
        error = resolve(schema, operation["responses"][status]["content"]["application/json"]["schema"])
        assert error == schema["components"]["schemas"]["ErrorResponse"], status
    assert operation["security"] == [{"HTTPBearer": []}]


def test_the_error_object_is_openais(schema: dict[str, Any]) -> None:
    error = resolve(schema, schema["components"]["schemas"]["ErrorResponse"]["properties"]["error"])
    assert set(error["required"]) == {"message", "type", "param", "code"}


def test_no_422_and_no_validation_error_anywhere(schema: dict[str, Any]) -> None:
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            assert "422" not in operation["responses"], (method, path)
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    assert "ValidationError" not in schema["components"]["schemas"]


def test_bearer_auth_is_declared(schema: dict[str, Any]) -> None:
    assert schema["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "A Qubax API key, `qbx_live_…` or `qbx_test_…`.",
    }
    assert schema["paths"]["/v1/models"]["get"]["security"] == [{"HTTPBearer": []}]


def test_images_are_documented_as_images(schema: dict[str, Any]) -> None:
    operation = schema["paths"]["/images/{name}"]["get"]
    content = operation["responses"]["200"]["content"]
    assert set(content) == {"image/png", "image/jpeg", "image/webp"}
    assert content["image/png"]["schema"] == {"type": "string", "format": "binary"}
    assert {"403", "404", "410"} <= set(operation["responses"])
    assert "security" not in operation  # the signature is the permission


def test_jobs_are_documented(schema: dict[str, Any]) -> None:
    accepted = schema["paths"]["/v1/images/generations"]["post"]["responses"]["202"]
    assert accepted["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ImageJob"}
    job = schema["components"]["schemas"]["ImageJob"]
    assert set(job["required"]) == {"id", "status", "created_at", "completed_at", "model", "result", "error"}
    listed = schema["paths"]["/v1/images/jobs"]["get"]
    assert {parameter["name"] for parameter in listed["parameters"]} == {"limit", "after"}


def test_every_public_endpoint_is_in_the_schema(schema: dict[str, Any]) -> None:
    assert set(schema["paths"]) == {
        "/v1/images/generations",
        "/v1/images/edits",
        "/v1/images/jobs",
        "/v1/images/jobs/{job_id}",
        "/v1/images/jobs/{job_id}/cancel",
        "/v1/models",
        "/v1/models/{model_id}",
        "/images/{name}",
        "/healthz",
        "/",
        "/v1/upstream-callbacks/{provider}/{ref}/{signature}",  # for upstreams, not clients; documented all the same
    }


def test_docs_page_loads_its_assets_from_this_server(base_url: str) -> None:
    page = httpx.get(f"{base_url}/docs")
    assert page.status_code == 200
    assert "http://" not in page.text.replace(base_url, "") and "https://" not in page.text.split("<body>")[1]
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "favicon.png"):
        assert f"/docs/assets/{asset}" in page.text
        served = httpx.get(f"{base_url}/docs/assets/{asset}")
        assert served.status_code == 200 and len(served.content) > 1000, asset


def test_admin_api_is_documented_only_for_the_admin_token(settings: Settings) -> None:
    settings.admin_token = SecretStr(TOKEN)
    with serve(create_app(settings)) as url:
        public = httpx.get(f"{url}/openapi.json").json()
        assert not [path for path in public["paths"] if path.startswith("/admin")]
        assert httpx.get(f"{url}/admin/openapi.json").status_code == 401
        admin = httpx.get(f"{url}/admin/openapi.json", headers={"authorization": f"Bearer {TOKEN}"})
    assert admin.status_code == 200
    paths = admin.json()["paths"]
    assert set(paths) == {
        "/admin/keys",
        "/admin/keys/{key_id}",
        "/admin/keys/{key_id}/revoke",
        "/admin/keys/{key_id}/webhook",
        "/admin/webhooks",
        "/admin/usage",
    }
    assert "422" not in paths["/admin/keys"]["post"]["responses"]
    assert "400" in paths["/admin/keys"]["post"]["responses"]


CHROMIUM = shutil.which("chromium")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium; scripts/test does)")
def test_docs_render_in_a_browser_that_reaches_nothing_else(base_url: str) -> None:
    """Swagger UI, in a real browser whose every request to another host is refused: the page still
    shows the API's operations, so it works on a machine without internet."""
    from playwright.sync_api import Route, sync_playwright

    outside: list[str] = []

    def only_ours(route: Route) -> None:
        if route.request.url.startswith(base_url):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.route("**/*", only_ours)
            page.goto(f"{base_url}/docs")
            page.wait_for_selector(".opblock-summary-path", timeout=20_000)
            paths = page.locator(".opblock-summary-path").all_inner_texts()
            authorize = page.locator("button.authorize").count()
        finally:
            browser.close()
    assert "/v1/images/generations" in [path.replace("\u200b", "") for path in paths]
    assert len(paths) == 11
    assert authorize == 1  # the bearer scheme is there to fill in
    assert outside == []
