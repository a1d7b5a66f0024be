"""Schemathesis over mach-serve's own OpenAPI schema against a live server: generated requests, valid
(positive) and invalid (negative), never get a 5xx. Examples are bounded (and generation lengths capped) so the
run stays short."""

import pytest

from mach_runtime.server.settings import ServerSettings
from tests.server_helpers import MODEL, serve_in_thread

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402


@pytest.fixture(scope="module")
def live():
    with serve_in_thread(ServerSettings(streaming=False, max_batch=4)) as (base, app):
        yield base


def bounded(case):
    """Generation requests reach the model (the served name) but stay a few tokens long."""
    if isinstance(case.body, dict):
        if "model" in case.body and case.operation.path != "/v1/cache/warm_prefix":
            case.body["model"] = MODEL
        for key in ("max_tokens", "max_completion_tokens"):
            v = case.body.get(key)
            if isinstance(v, int) and not isinstance(v, bool):
                case.body[key] = max(1, min(v, 3))
        if case.operation.path in ("/v1/chat/completions", "/v1/completions") and "max_tokens" not in case.body:
            case.body["max_tokens"] = 3
    return case


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, pytest.param(GenerationMode.NEGATIVE, marks=pytest.mark.slow)])
def test_no_server_errors(live, mode):
    schema = schemathesis.openapi.from_url(live + "/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/messages",
                                              "/v1/models", "/v1/capabilities", "/metrics"}
    for op in operations:
        if mode == GenerationMode.NEGATIVE and op.method.upper() != "POST":
            continue  # nothing to get wrong in a GET without parameters

        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def check(case):
            if case.operation.path == "/v1/cache/warm_prefix":  # 501 by design until the prefix cache lands
                r = bounded(case).call(base_url=live, timeout=120)
                assert r.status_code in (200, 400, 501), r.text
                return
            bounded(case).call_and_validate(base_url=live, checks=[not_a_server_error], timeout=120)

        check()
