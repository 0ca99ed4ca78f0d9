"""Property-based: schemathesis sends requests made from /openapi.json (valid ones and invalid ones) to
the running app, and every answer must be one the schema documents: no 5xx, only documented statuses and
content types, bodies that match their schemas."""

import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.schemas import APIOperation
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


SETTINGS = hypothesis_settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
# Random model names are all 404s; these reach validation against a model, and the images themselves.
MODELS = st.sampled_from(["flux-1.1-pro", "flux-1-schnell", "flux-1.1-pro-ultra", "dall-e-3", "flux-pro"])
SIZES = st.sampled_from(["256x256", "1024x1024", "2048x2048", "auto", "1024x1792", "300x300"])


def test_answers_keep_to_the_schema(base_url: str, test_key: str) -> None:
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 11
    statuses = {operation.path: exercise(operation, test_key) for operation in operations}
    # The requests went deep enough: images were made, and refusals came from our own validation.
    assert {200, 400}.issubset(statuses["/v1/images/generations"]), statuses


def exercise(operation: APIOperation, key: str) -> set[int]:
    """Every check on the operation's generated requests; returns the statuses seen."""
    statuses: set[int] = set()
    generations = operation.path == "/v1/images/generations"

    @given(case=operation.as_strategy(), model=MODELS, size=SIZES, real=st.booleans())
    @SETTINGS
    def check(case: schemathesis.Case, model: str, size: str, real: bool) -> None:
        if generations and real and isinstance(case.body, dict):  # a plausible request, to get past the checks
            case.body = {"prompt": "a cat", "model": model, "size": size, "response_format": "b64_json"}
        response = case.call_and_validate(headers={"authorization": f"Bearer {key}"}, checks=CHECKS)
        statuses.add(response.status_code)

    check()
    return statuses
