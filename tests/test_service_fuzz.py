"""Property tests of the live job API against its own OpenAPI document (Schemathesis): generated
requests, with a valid, a wrong or no API key, never get a 5xx and get answers as documented
(status code, content type, response schema). uvicorn on loopback over a real redis-server and the
tests' Ray head (for the readiness probe; no dispatcher runs, so jobs stay queued). Derandomized:
the same requests each run."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from service.api.main import create_app
from tests.services import ApiServer, RedisServer, api_settings

KEY = "key-acme"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# Most requests carry the valid key, so they get past authentication and exercise the routes.
API_KEYS = st.sampled_from([KEY, KEY, KEY, KEY, "key-wrong", None])
# A schema-violating request must be refused with a 4xx (413 included: an oversized spec is refused by size).
REJECTIONS = [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429]
# No made-up extra headers: names such as Content-Length with garbage values are refused by uvicorn's
# HTTP parser (400) before the app sees them.
CONFIG = {"checks": {"negative_data_rejection": {"expected-statuses": REJECTIONS}},
          "generation": {"allow-extra-parameters": False}}
PUBLIC = {"/healthz", "/readyz", "/metrics"}
SLOW_IS_FINE = [HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture]
QUICK = {"deadline": None, "derandomize": True, "suppress_health_check": SLOW_IS_FINE}


@pytest.fixture(scope="module")
def live_api(tmp_path_factory, ray_head):
    tmp = tmp_path_factory.mktemp("fuzz")
    redis_server = RedisServer(tmp / "redis").start()
    settings = api_settings(redis_server.url, tmp, ray_address=ray_head.jobs_url, max_active_jobs=1000)
    server = ApiServer(create_app(settings)).start()
    yield server
    server.stop()
    redis_server.stop()


@pytest.fixture(scope="module")
def openapi(live_api):
    return schemathesis.openapi.from_url(f"{live_api.url}/openapi.json", config=schemathesis.Config.from_dict(CONFIG))


schema = schemathesis.pytest.from_fixture("openapi")


def auth_headers(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def answered_before_auth(answer) -> bool:
    """What is refused before any route checks the key: a body over the limit (413), a URL matching
    no route (404/405), and a body that is not JSON at all (400 not UTF-8, 422 `json_invalid`):
    FastAPI reads the body before it runs a route's dependencies."""
    if answer.status_code in (400, 413):
        return True
    if answer.status_code == 422:
        return [error["type"] for error in answer.json()["detail"]] == ["json_invalid"]
    return answer.status_code in (404, 405) and answer.json() in ({"detail": "Not Found"},
                                                                  {"detail": "Method Not Allowed"})


@schema.parametrize()
@settings(phases=[Phase.explicit], **QUICK)
def test_boundary_cases_of_every_parameter_are_answered_as_documented(case, live_api):
    """Schemathesis's coverage phase: each parameter and body field at and past its limits, wrong
    types, missing required parts (the API key among them), unsupported methods. Schema-violating
    requests must get a 4xx; for a 2xx answer `ignored_auth` sends the request again without and
    with a wrong key and expects 401."""
    checks = [*CHECKS, negative_data_rejection, ignored_auth]
    case.call_and_validate(base_url=live_api.url, headers=auth_headers(KEY), checks=checks, timeout=10)


@schema.parametrize()
@schema.given(key=API_KEYS)
@settings(max_examples=25, **QUICK)
def test_generated_requests_with_any_key_are_answered_as_documented(case, key, live_api):
    """Schemathesis's fuzzing phase (positive and negative data), each request with the valid key,
    a wrong one or none; whatever reaches a route without the valid key is refused with 401."""
    answer = case.call_and_validate(base_url=live_api.url, headers=auth_headers(key), checks=CHECKS, timeout=10)
    if key != KEY and case.path not in PUBLIC and not answered_before_auth(answer):
        assert answer.status_code == 401, (key, answer.status_code, answer.text)


def test_a_nul_byte_in_a_spec_path_is_refused_with_422(live_api):
    spec = {"method": "sre2l", "dataset": {"root": "/usr/share/datasets/\x00fashion-mnist"}}
    with live_api.client(KEY) as client:
        answer = client.post("/v1/jobs", json=spec)
    assert answer.status_code == 422, answer.text  # found by fuzzing: it was a 500 (realpath on a NUL byte)
    assert "dataset.root" in answer.json()["message"]
