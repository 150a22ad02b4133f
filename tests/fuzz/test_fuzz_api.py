"""Fuzz the whole API from its OpenAPI document with every schemathesis check: no 5xx, every error in the
envelope, every answer as documented, schema-valid requests accepted and schema-invalid ones refused
(except the listed known refusals, tests/fuzz/fuzzing.py), authentication enforced.

The CI pass generates STABLETRAIN_FUZZ_EXAMPLES (default 4) requests per operation and mode, about
150 requests in all. For a full run set it higher, e.g. 30 (over 1,000 requests):

    STABLETRAIN_FUZZ_EXAMPLES=30 .venv/bin/python -m pytest tests/fuzz -s
"""

from __future__ import annotations

import os

import pytest

from app.services import samples as samples_service
from tests.fuzz.conftest import Seeded
from tests.fuzz.fuzzing import run_fuzz

EXAMPLES = int(os.environ.get("STABLETRAIN_FUZZ_EXAMPLES", "4"))
SEED = int(os.environ.get("STABLETRAIN_FUZZ_SEED", "0"))  # fixed by default so a CI failure reproduces


@pytest.fixture
def no_sample_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """POST .../samples waits up to `wait` s for a worker; no worker runs here, so do not wait."""
    original = samples_service.wait_for
    monkeypatch.setattr(samples_service, "wait_for", lambda sample, _wait_s: original(sample, 0.0))


def test_fuzz_whole_api(seeded: Seeded, no_sample_wait: None, capsys: pytest.CaptureFixture[str]) -> None:
    lines: list[str] = []
    report = run_fuzz(seeded, EXAMPLES, seed=SEED, log=lines.append)
    with capsys.disabled():
        print(f"\nfuzz on {seeded.app.config['DATABASE_URL'].split(':')[0]} (STABLETRAIN_FUZZ_EXAMPLES={EXAMPLES}, "
              f"SEED={SEED}): {report.summary()}")
    assert not report.failures, "\n\n".join(report.failures)
    assert len(report.by_operation) >= 20, report.by_operation
    assert report.requests >= EXAMPLES * 20, report.summary()
    assert any(code < 300 for code in report.by_status), "no request ever succeeded: the fuzzer only saw errors"


def test_every_schemathesis_check_runs() -> None:
    """The fuzz runs all of them, by name: a schemathesis upgrade that adds one adds it here too."""
    from tests.fuzz.fuzzing import CHECKS, HOSTILE_CASE_CHECKS

    names = {check.__name__ for check in CHECKS}
    assert {"not_a_server_error", "status_code_conformance", "content_type_conformance",
            "response_headers_conformance", "response_schema_conformance", "positive_data_acceptance",
            "negative_data_rejection", "missing_required_header", "unsupported_method", "allow_header_conformance",
            "use_after_free", "ensure_resource_availability", "ignored_auth", "object_level_authorization",
            "error_envelope"} <= names
    assert names - {check.__name__ for check in HOSTILE_CASE_CHECKS} == {"positive_data_acceptance",
                                                                          "negative_data_rejection"}


def test_openapi_declares_errors_and_security(seeded: Seeded) -> None:
    """What the fuzzer checks answers against: bearer security on every operation, 401 and 429 everywhere,
    404 on every path with an id, 400/413/415 with every body, and all of them in the envelope."""
    spec = seeded.app.test_client().get("/v1/openapi.json").json
    assert spec["security"] == [{"bearer": []}]
    assert spec["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    envelope = spec["components"]["schemas"]["Error"]["properties"]["error"]
    assert envelope == {"$ref": "#/components/schemas/ErrorBody"}
    assert set(spec["components"]["schemas"]["ErrorBody"]["properties"]) == {"code", "message", "details"}
    operations = 0
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if method not in ("get", "post", "put", "patch", "delete"):
                continue
            operations += 1
            assert "security" not in operation, (method, path)  # nothing in /v1 opts out
            responses = operation["responses"]
            wanted = {"401", "429", "default"} | ({"404"} if "{" in path else set())
            wanted |= {"400", "413", "415"} if "requestBody" in operation else set()
            assert wanted <= set(responses), (method, path, sorted(responses))
            for status in wanted:
                response = responses[status]
                if "$ref" in response:
                    response = spec["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
                assert response["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    assert operations >= 20
