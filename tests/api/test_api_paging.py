"""Keyset paging of the four job listings (steps, layers, activations, events) with `cursor`.

The property: for every page size from 1 to N+1, following next_cursor yields exactly the full listing,
even where a page ends inside a step (several layer/activation rows, or events, share a step) and where
layer rows without a position (an old job) sit next to positioned ones. Cursors are validated against
the pattern the OpenAPI document states: every string it allows is accepted, anything else is a 422.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.services import cursors
from tests.api import listing_seed as seed
from tests.api.listing_seed import follow

LISTINGS = {  # listing -> (path suffix, parameter that starts a listing, total rows)
    "steps": ("/metrics", "after_step", seed.N_STEPS),
    "layers": ("/metrics/layers", "after_step", len(seed.layer_rows("j"))),
    "activations": ("/metrics/activations", "after_step", len(seed.activation_rows("j"))),
    "events": ("/events", "after_id", len(seed.EVENT_STEPS)),
}


@pytest.fixture
def filled(app: Flask, job: dict[str, Any]) -> str:
    with app.app_context():
        seed.fill(job["id"])
    return job["id"]


def _full(client: FlaskClient, auth: dict[str, str], url: str) -> list[dict[str, Any]]:
    body = client.get(f"{url}?limit=1000", headers=auth).json
    assert body["next_cursor"] is None
    return body["items"]


def _key(listing: str, row: dict[str, Any]) -> tuple[Any, ...]:
    if listing == "events":
        return (row["id"],)
    if listing == "steps":
        return (row["step"],)
    return (row["step"], row["position"], row.get("layer", row.get("site")))


@pytest.mark.parametrize("listing", LISTINGS)
def test_every_page_size_joins_up_to_the_full_listing(client: FlaskClient, auth: dict[str, str], filled: str,
                                                      listing: str) -> None:
    suffix, _start, total = LISTINGS[listing]
    url = f"/v1/jobs/{filled}{suffix}"
    full = _full(client, auth, url)
    assert len(full) == total
    keys = [_key(listing, r) for r in full]
    assert len(set(keys)) == len(keys)
    for limit in range(1, total + 2):
        assert follow(client, auth, f"{url}?limit={limit}") == full, limit


def test_layer_order_with_and_without_positions(client: FlaskClient, auth: dict[str, str], filled: str,
                                                app: Flask) -> None:
    """Positioned rows in depth order; rows without a position in name order, where the database's index
    puts nulls (first on SQLite, last on PostgreSQL), and the cursor follows that order."""
    full = _full(client, auth, f"/v1/jobs/{filled}/metrics/layers")
    by_step: dict[int, list[tuple[Any, str]]] = {}
    for row in full:
        by_step.setdefault(row["step"], []).append((row["position"], row["layer"]))
    assert [name for _p, name in by_step[1]] == sorted(seed.LAYERS)
    assert [name for _p, name in by_step[5]] == seed.LAYERS
    positioned = [(i, n) for i, n in enumerate(seed.LAYERS) if not i % 2]
    unpositioned = sorted((None, n) for i, n in enumerate(seed.LAYERS) if i % 2)
    nulls_first = app.config["DATABASE_URL"].startswith("sqlite")
    assert by_step[11] == (unpositioned + positioned if nulls_first else positioned + unpositioned)


@pytest.mark.parametrize("listing", LISTINGS)
def test_start_parameter_then_cursor(client: FlaskClient, auth: dict[str, str], filled: str, listing: str) -> None:
    suffix, start, _total = LISTINGS[listing]
    url = f"/v1/jobs/{filled}{suffix}"
    full = _full(client, auth, url)
    if listing == "events":
        after = full[3]["id"]
        expected = full[4:]
    else:
        after = 4
        expected = [r for r in full if r["step"] > 4]
    for limit in (1, 2, 3, 7):
        assert follow(client, auth, f"{url}?{start}={after}&limit={limit}") == expected


def test_filtered_listings_page_too(client: FlaskClient, auth: dict[str, str], filled: str) -> None:
    base = f"/v1/jobs/{filled}"
    layer = follow(client, auth, f"{base}/metrics/layers?layer=head.weight&limit=2")
    assert [r["step"] for r in layer] == list(range(1, seed.N_STEPS)) and {r["layer"] for r in layer} == {"head.weight"}
    site = follow(client, auth, f"{base}/metrics/activations?site=blocks.1.attn&limit=4")
    assert [r["step"] for r in site] == list(range(2, seed.N_STEPS + 1, 2))
    assert [r["attn_max_logit"] for r in site] == [5.0 + s for s in range(2, seed.N_STEPS + 1, 2)]


def test_downsampled_pages_keep_joining_up(client: FlaskClient, auth: dict[str, str], filled: str) -> None:
    url = f"/v1/jobs/{filled}/metrics"
    first = client.get(f"{url}?limit=5&max_points=3", headers=auth).json
    assert len(first["items"]) <= 5 and first["next_after_step"] == 5
    assert first["next_cursor"] == cursors.encode("steps", cursors.RowKey(5))
    steps = [r["step"] for r in follow(client, auth, f"{url}?limit=5&max_points=3")]
    assert steps == sorted(set(steps)) and steps[-1] == seed.N_STEPS
    assert {s for s in steps if s > 5} and min(s for s in steps if s > 5) <= 10  # the second page was read


def test_activation_rows(client: FlaskClient, auth: dict[str, str], filled: str) -> None:
    items = _full(client, auth, f"/v1/jobs/{filled}/metrics/activations")
    assert [(r["step"], r["position"], r["site"]) for r in items] == [
        (s, i, site) for s in range(2, seed.N_STEPS + 1, 2) for i, (site, _k) in enumerate(seed.SITES)]
    assert set(items[0]) == {"step", "site", "position", "kind", "mean", "std", "saturated_frac", "dead_frac",
                             "attn_max_logit", "attn_entropy", "z_lse", "grad_time", "grad_time_ratio"}
    head = items[3]
    assert head["kind"] == "output" and abs(head["z_lse"] - 4.60517) < 1e-4 and head["attn_max_logit"] is None


def test_the_reported_bug_84_layer_rows_with_limit_3(app: Flask, client: FlaskClient, auth: dict[str, str],
                                                     job: dict[str, Any]) -> None:
    """Before cursors, limit=3 over 12 steps x 7 layers returned 36 of the 84 rows: a page ending inside a
    step made the next page skip the rest of that step."""
    from sqlalchemy import insert

    from app.extensions import db
    from app.models import LayerMetric

    names = [f"layers.{i}.weight" for i in range(7)]
    with app.app_context():
        db.session.execute(insert(LayerMetric), [
            {"job_id": job["id"], "step": 10 * s, "layer": n, "position": i, "grad_norm": 1.0}
            for s in range(1, 13) for i, n in enumerate(names)])
        db.session.commit()
    rows = follow(client, auth, f"/v1/jobs/{job['id']}/metrics/layers?limit=3")
    assert [(r["step"], r["layer"]) for r in rows] == [(10 * s, n) for s in range(1, 13) for n in names]


BAD_CURSORS = ["", "x", "s", "s-1", "s1.5", "s12345678901", "l1.2", "l1.2.a", "l1.x.YQ", "e1 ", "s1\n", "a1.n.YQ",
               "l1.2.YQ==", "eyJzdGVwIjogMX0=", "%00", "s" + "1" * 2000]


@pytest.mark.parametrize("listing", LISTINGS)
def test_malformed_cursors_are_422_with_the_field(client: FlaskClient, auth: dict[str, str], filled: str,
                                                  listing: str) -> None:
    suffix, start, _total = LISTINGS[listing]
    url = f"/v1/jobs/{filled}{suffix}"
    others = [cursors.encode(other, cursors.RowKey(1, 0, "x")) for other in LISTINGS if other != listing]
    for bad in BAD_CURSORS + others:
        response = client.get(url, query_string={"cursor": bad}, headers=auth)
        assert response.status_code == 422, (bad, response.json)
        error = response.json["error"]
        assert error["code"] == "validation_error" and "cursor" in error["details"], error
    good = cursors.encode(listing, cursors.RowKey(1, 0, "x"))
    assert client.get(url, query_string={"cursor": good}, headers=auth).status_code == 200


@pytest.mark.parametrize("listing", LISTINGS)
def test_cursor_and_start_parameter_together_start_after_the_later(client: FlaskClient, auth: dict[str, str],
                                                                   filled: str, listing: str) -> None:
    """OpenAPI cannot say "not both", so both are accepted: each is a lower bound."""
    suffix, start, _total = LISTINGS[listing]
    url = f"/v1/jobs/{filled}{suffix}"
    full = _full(client, auth, url)
    at = 2 if listing != "events" else 1
    cursor = client.get(f"{url}?limit={at}", headers=auth).json["next_cursor"]
    later = full[5]["id"] if listing == "events" else 6
    expected = full[6:] if listing == "events" else [r for r in full if r["step"] > 6]
    assert client.get(f"{url}?limit=1000&cursor={cursor}&{start}={later}", headers=auth).json["items"] == expected
    assert client.get(f"{url}?limit=1000&cursor={cursor}&{start}=0", headers=auth).json["items"] == full[at:]


def _cursor_parameter(client: FlaskClient, path: str) -> dict[str, Any]:
    doc = client.get("/v1/openapi.json").json
    params = doc["paths"][path]["get"]["parameters"]
    return next(p for p in params if p["name"] == "cursor")


DOCUMENTED = {"steps": "/v1/jobs/{job_id}/metrics", "layers": "/v1/jobs/{job_id}/metrics/layers",
              "activations": "/v1/jobs/{job_id}/metrics/activations", "events": "/v1/jobs/{job_id}/events"}


@pytest.mark.parametrize("listing", LISTINGS)
def test_openapi_states_exactly_what_a_cursor_may_be(client: FlaskClient, auth: dict[str, str], filled: str,
                                                     listing: str) -> None:
    """Strings generated from the documented pattern and length are all accepted (200), so a fuzzer that
    trusts the document never sees a valid-looking cursor refused."""
    schema = _cursor_parameter(client, DOCUMENTED[listing])["schema"]
    assert schema["type"] == "string" and schema["pattern"] == cursors.PATTERNS[listing]
    assert schema["maxLength"] == cursors.MAX_LENGTH and schema["minLength"] == 2
    pattern = re.compile(schema["pattern"])
    assert all(pattern.fullmatch(c) is None for c in BAD_CURSORS if len(c) <= schema["maxLength"] and c != "s1\n")
    url = f"/v1/jobs/{filled}{LISTINGS[listing][0]}"

    @settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.from_regex(pattern, fullmatch=True).filter(lambda c: 2 <= len(c) <= schema["maxLength"]))
    def accepted(cursor: str) -> None:
        response = client.get(url, query_string={"cursor": cursor}, headers=auth)
        assert response.status_code == 200, (cursor, response.json)

    accepted()


NEWEST_FIRST = ("/v1/jobs", "/v1/datasets")


@pytest.mark.parametrize("path", NEWEST_FIRST)
def test_newest_first_listings_document_their_cursor_exactly(client: FlaskClient, auth: dict[str, str],
                                                             job: dict[str, Any], path: str) -> None:
    """/v1/jobs and /v1/datasets page on (created_at, id): their cursor is `n<microseconds>.<id>`, every
    string of that pattern is accepted and anything else is a 422."""
    schema = _cursor_parameter(client, path)["schema"]
    assert schema["pattern"] == cursors.PATTERNS["newest"] and schema["maxLength"] == cursors.MAX_LENGTH
    pages = []
    page = client.get(f"{path}?limit=1", headers=auth).json
    while page["next_cursor"]:
        assert re.fullmatch(schema["pattern"], page["next_cursor"])
        pages += page["items"]
        page = client.get(f"{path}?limit=1&cursor={page['next_cursor']}", headers=auth).json
    pages += page["items"]
    assert [i["id"] for i in pages] == [i["id"] for i in client.get(f"{path}?limit=200", headers=auth).json["items"]]
    assert len(pages) == 1  # the job fixture made one job and one dataset
    for bad in ("WyIyMDIwLTAxLTAxIiwgIi4uLy4uIl0", "n1.job_x", "n123456789012345678.job_" + "0" * 24, "s1", "@@@"):
        response = client.get(path, query_string={"cursor": bad}, headers=auth)
        assert response.status_code == 422 and "cursor" in response.json["error"]["details"], bad

    @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.from_regex(schema["pattern"], fullmatch=True))
    def accepted(cursor: str) -> None:
        assert client.get(path, query_string={"cursor": cursor}, headers=auth).status_code == 200, cursor

    accepted()


def test_cursor_id_shape_is_the_models_id_shape() -> None:
    from app.models import ID_PATTERN

    assert cursors.SERVER_ID == ID_PATTERN.pattern.replace("(", "(?:")


def test_cursor_round_trips_names_and_null_positions() -> None:
    for key in (cursors.RowKey(7, None, "layers.0.rnn.weight_ih_l0"), cursors.RowKey(0, 0, ""),
                cursors.RowKey(2**31 - 1, 12, "blöcks.ü.ñ/\u2603" * 20)):
        for listing in ("layers", "activations"):
            if listing == "activations" and key.position is None:
                continue
            encoded = cursors.encode(listing, key)
            assert cursors.matches(listing, encoded) and cursors.decode(listing, encoded) == key
    assert cursors.decode("steps", "s42") == cursors.RowKey(42)
    assert cursors.decode("layers", "l1.2.__8").name == "\ufffd\ufffd"  # not UTF-8: accepted, replaced
    assert cursors.decode("layers", "l1.2.AA").name == "\ufffd"  # a NUL cannot reach the database


def test_schemathesis_finds_no_documented_request_refused(client: FlaskClient, auth: dict[str, str], filled: str,
                                                          app: Flask) -> None:
    """What an independent schemathesis run checks: every request the document allows for the four listings
    (any documented cursor, start, limit, filter) is accepted. Cross-parameter rules cannot be documented,
    so there are none: a cursor with after_step is two lower bounds, not an error."""
    import schemathesis
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation import GenerationMode
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    schema = schemathesis.openapi.from_wsgi("/v1/openapi.json", app)
    checked = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.method.upper() != "GET" or operation.path not in {*DOCUMENTED.values(), *NEWEST_FIRST}:
            continue
        params = {"job_id": filled} if "{job_id}" in operation.path else {}
        strategy = operation.as_strategy(generation_mode=GenerationMode.POSITIVE, path_parameters=params)

        @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def accepted(case: Any) -> None:
            case.headers = {**(case.headers or {}), **auth}
            response = case.call()
            case.validate_response(response, checks=[not_a_server_error, positive_data_acceptance])

        accepted()
        checked += 1
    assert checked == 6
