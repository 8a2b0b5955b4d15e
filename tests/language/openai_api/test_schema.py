"""Bad input from a generator: schemathesis sends requests built from the service's own
/openapi.json (valid and invalid bodies, odd strings and numbers, wrong types, missing fields);
none may get a 5xx, and every error must be an OpenAI error body.

The number of examples per route is bounded (EXAMPLES_PER_ROUTE, about ten routes), and the
context is short, so every generated completion ends within a few dozen tokens.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from services.language.engine import EngineConfig
from tests.e2e.inprocess import language_server
from tests.e2e.support import servable_copy

EXAMPLES_PER_ROUTE = 60
KEY = "schema-key"
OPENAI_ERROR_FIELDS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def server(tiny_vl, tmp_path_factory):
    from tests.e2e.support import InProcessEncoder

    served = servable_copy(tiny_vl[0], tmp_path_factory.mktemp("schema_served"))
    engine = EngineConfig(kv_cache_memory=8 * 2**20, max_model_len=64)
    with language_server(
        served,
        InProcessEncoder(served),
        engine,
        api_key=KEY,
        model_name="tiny",
        max_request_bytes=1 << 20,
    ) as srv:
        yield srv


def _check(case, calls: list) -> None:
    response = case.call(headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    calls.append(response.status_code)
    where = f"{case.method} {case.formatted_path} body={str(case.body)[:300]!r}"
    assert response.status_code < 500, f"{where} -> {response.status_code} {response.text[:500]}"
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"} and set(body["error"]) == OPENAI_ERROR_FIELDS, where
        assert isinstance(body["error"]["message"], str) and body["error"]["message"], where
    elif "text/event-stream" in response.headers.get("content-type", ""):
        # A stream may end in an error event; it must not be an internal error
        assert response.text.rstrip().endswith("data: [DONE]"), where
        assert '"internal_error"' not in response.text, f"{where} -> {response.text[-500:]}"


def test_no_5xx_and_every_error_is_openai_json(server):
    from hypothesis import given
    from hypothesis import strategies as st
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")
    calls: list[int] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8
    for operation in operations:
        strategy = st.one_of(
            operation.as_strategy(GenerationMode.POSITIVE),
            operation.as_strategy(GenerationMode.NEGATIVE),
        )

        @given(case=strategy)
        @settings(
            max_examples=EXAMPLES_PER_ROUTE,
            deadline=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def run(case):
            _check(case, calls)

        run()
    # Bounded: at most EXAMPLES_PER_ROUTE per route (hypothesis may stop a route early)
    assert len(calls) <= EXAMPLES_PER_ROUTE * len(operations) * 2
    print(
        f"schemathesis: {len(calls)} requests over {len(operations)} routes, statuses "
        f"{sorted(set(calls))}"
    )


def test_the_schema_lists_the_openai_routes(server):
    import httpx

    paths = httpx.get(f"{server.base_url}/openapi.json", timeout=10).json()["paths"]
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/ready"} <= set(
        paths
    )
