"""Schema-driven fuzzing (schemathesis + hypothesis) over the API's own OpenAPI schema: valid and invalid
queries, bodies and parameters for every operation; no answer may be a 5xx, and every answer must be one the
schema declares (status, content type, body shape). Bounded example counts keep it to seconds."""
from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance, negative_data_rejection, response_schema_conformance, status_code_conformance,
)

from pipeline.serving.api import create_app  # noqa: E402
from tests.serving.api_helpers import double_app  # noqa: E402
from tests.serving.tiny_bundle import copy_bundle, shared_tiny_bundle  # noqa: E402

CHECKS = [status_code_conformance, content_type_conformance, response_schema_conformance, negative_data_rejection]
FUZZ = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


def no_server_error(case, response):
    assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.status_code} {response.text}"
    if response.status_code >= 400:
        assert set(response.json()) == {"error"}


TOKEN = "fuzz-token"
# Built at import: schemathesis' `from_fixture` does not run under pytest 9, and the double costs nothing.
double_schema = schemathesis.openapi.from_asgi("/openapi.json", double_app(token=TOKEN, has_text=True)[0])


@pytest.fixture(scope="module")
def bundle_app(tmp_path_factory):
    """The app on a private copy of a real bundle, token set: fuzzed adds and removes reach the bundle's writer."""
    pytest.importorskip("tensorflow")
    root, _ = shared_tiny_bundle(tmp_path_factory)
    return create_app(copy_bundle(root, tmp_path_factory.mktemp("fuzzed") / "bundle"), token=TOKEN)


@double_schema.parametrize()
@FUZZ
def test_every_operation_fuzzed_gives_declared_answers_and_no_5xx(case):
    response = case.call()
    no_server_error(case, response)
    case.validate_response(response, checks=CHECKS)


# The real app has the double's schema (same routes, same token setting); its cases are sent to it instead.
@double_schema.include(path_regex="^/(search|embed|items)").parametrize()
@settings(FUZZ, max_examples=15)
def test_fuzzed_requests_on_a_real_bundle_give_no_5xx(case, bundle_app):
    response = case.call(app=bundle_app, headers={"Authorization": f"Bearer {TOKEN}"})
    no_server_error(case, response)
    case.validate_response(response, checks=CHECKS)
