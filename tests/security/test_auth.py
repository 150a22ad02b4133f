"""Item 9: every route but the public ones needs a key; keys are random, stored only as sha256,
compared in constant time and revocable by the CLI; a second key sees none of the first key's data.

tests/api/test_api_auth.py already covers the CLI round trip (create, list, revoke -> 401) and a
second key's 404 on each /v1 rule with an id. This module walks the URL map for the rest: 401 on
every non-public route and method (no key, a wrong key, a revoked key), the public set itself (a new
public route must be added here on purpose), the second key's lists and the owner's records staying
intact after its attempts, the owner reaching every route, and the key material itself.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from inspect import getsource
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import inspect, select, text

from app import auth as auth_module
from app.extensions import db
from app.models import Dataset, Job, Sample
from tests.conftest import create_key
from tests.fuzz.conftest import Seeded

# No key needed: liveness, readiness, Prometheus, docs, the OpenAPI document; the dashboard's static
# pages (they hold no data: the browser calls /v1 with the user's key) and static files.
PUBLIC_RULES = {"/healthz", "/readyz", "/metrics", "/docs", "/v1/openapi.json", "/static/<path:filename>",
                "/ui/", "/ui/jobs/<string:job_id>", "/ui/static/<path:filename>"}
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


def _routes(app: Flask, ids: dict[str, str]) -> list[tuple[str, str, str]]:
    """(rule, method, url) for every rule and method of the URL map, ids filled in."""
    out = []
    for rule in app.url_map.iter_rules():
        url = rule.rule
        for name in rule.arguments:
            url = re.sub(rf"<(?:\w+:)?{name}>", ids.get(name, "x"), url)
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            out.append((rule.rule, method, url))
    return out


def _ids(seeded: Seeded) -> dict[str, str]:
    return {name: values[0] for name, values in seeded.ids.items()} | {"filename": "x.css"}


def _assert_401(response: Any, where: Any) -> None:
    assert response.status_code == 401, (where, response.status_code, response.data[:200])
    assert set(response.json["error"]) == {"code", "message", "details"}, where
    assert response.json["error"]["code"] == "unauthorized", where
    assert response.headers["WWW-Authenticate"].startswith("Bearer"), where


def test_public_routes_are_exactly_these(seeded: Seeded) -> None:
    client = seeded.app.test_client()
    public = set()
    for rule, method, url in _routes(seeded.app, _ids(seeded)):
        if client.open(url, method=method).status_code != 401:
            public.add(rule)
    assert public == PUBLIC_RULES, "a route answers without a key: add it to PUBLIC_RULES only if it must"


def test_every_other_route_needs_a_valid_unrevoked_key(seeded: Seeded) -> None:
    app, client = seeded.app, seeded.app.test_client()
    runner = app.test_cli_runner()
    revoked_id, revoked = create_key(runner, "soon-revoked")
    assert runner.invoke(args=["keys", "revoke", revoked_id]).exit_code == 0
    bad_headers = [{}, {"Authorization": "Bearer st_" + "A" * 43}, {"Authorization": f"Bearer {revoked}"},
                   {"Authorization": seeded.auth["Authorization"].replace("Bearer", "Basic")},
                   {"Authorization": seeded.auth["Authorization"][:-1]},  # one character short
                   {"Authorization": "Bearer"}, {"Authorization": "Bearer \x00"}]
    checked = 0
    for rule, method, url in _routes(app, _ids(seeded)):
        if rule in PUBLIC_RULES:
            continue
        for headers in bad_headers:
            _assert_401(client.open(url, method=method, headers=headers, json={"prompt": "x"}),
                        (method, url, headers))
            checked += 1
    assert checked >= 20 * len(bad_headers)


def test_second_key_sees_nothing_and_changes_nothing(seeded: Seeded) -> None:
    app, client = seeded.app, seeded.app.test_client()
    other = {"Authorization": f"Bearer {create_key(app.test_cli_runner(), 'intruder')[1]}"}
    ids = _ids(seeded)
    with app.app_context():
        before = {"jobs": {j.id: j.status for j in db.session.execute(select(Job)).scalars()},
                  "datasets": set(db.session.execute(select(Dataset.id)).scalars()),
                  "samples": db.session.execute(select(Sample.id)).scalars().all()}
    visited = set()
    for rule, method, url in _routes(app, ids):
        if rule in PUBLIC_RULES:
            continue
        visited.add(rule)
        if "<" in rule:  # one of the owner's records: absent for the other key, whatever the method
            for job_id in seeded.ids["job_id"]:
                real = url.replace(ids["job_id"], job_id)
                response = client.open(real, method=method, headers=other, json={"prompt": "hi", "step": 100})
                assert response.status_code == 404, (method, real, response.status_code)
                assert response.json["error"]["code"] == "not_found"
                assert not any(v in response.get_data(as_text=True) for v in ("The end", "spikes")), real
        elif method == "GET":  # a list: none of the owner's ids in it
            body = client.get(url, headers=other).get_data(as_text=True)
            assert not any(v in body for values in seeded.ids.values() for v in values if len(v) > 5), url
    assert {r for r in visited if "<" in r} == {r.rule for r in app.url_map.iter_rules()
                                                if r.rule.startswith("/v1/") and "<" in r.rule}
    with app.app_context():
        db.session.expire_all()
        after = {"jobs": {j.id: j.status for j in db.session.execute(select(Job)).scalars()},
                 "datasets": set(db.session.execute(select(Dataset.id)).scalars()),
                 "samples": db.session.execute(select(Sample.id)).scalars().all()}
    assert after == before, "the other key's DELETE, cancel or sample changed the owner's records"


def test_owner_reaches_every_route(seeded: Seeded) -> None:
    client = seeded.app.test_client()
    for rule, method, url in _routes(seeded.app, _ids(seeded)):
        if rule in PUBLIC_RULES or method in ("POST", "DELETE"):
            continue  # writes are exercised above and in tests/api; reads must all find the records
        # (the seeded job is an lstm: once its records are found, its Hugging Face export is refused)
        expected = 409 if rule.endswith("/export") else 200
        with client.open(url, method=method, headers=seeded.auth) as response:
            assert response.status_code == expected, (url, response.status_code, response.data[:200])


def test_secret_is_32_random_bytes_from_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = auth_module.secrets.token_urlsafe

    def spy(nbytes: int) -> str:
        calls.append(nbytes)
        return real(nbytes)

    monkeypatch.setattr(auth_module.secrets, "token_urlsafe", spy)
    keys = {auth_module.new_secret() for _ in range(200)}
    assert len(keys) == 200 and calls and min(calls) >= 32
    for key in keys:  # st_ + 43 URL-safe base64 characters = 32 bytes, 256 bits
        assert re.fullmatch(r"st_[A-Za-z0-9_-]{43}", key), key


def test_only_the_sha256_is_stored(seeded: Seeded, caplog: pytest.LogCaptureFixture) -> None:
    app = seeded.app
    key_id, secret = create_key(app.test_cli_runner(), "stored")
    client = app.test_client()
    with caplog.at_level(logging.DEBUG):
        assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {secret}"}).status_code == 200
    assert secret not in caplog.text and secret[3:] not in caplog.text, "the key reached a log line"
    random_part = secret[3:]
    windows = {random_part[i:i + 8] for i in range(len(random_part) - 7)}
    with app.app_context():
        dump = []
        for table in db.metadata.sorted_tables:
            for row in db.session.execute(table.select()).all():
                dump.extend(str(value) for value in row)
        assert set(inspect(db.engine).get_table_names()) >= {t.name for t in db.metadata.sorted_tables}
        stored = db.session.execute(text("SELECT key_hash, prefix FROM api_keys WHERE id = :id"),
                                    {"id": key_id}).one()
    text_dump = "\n".join(dump)
    assert secret not in text_dump
    assert not [w for w in windows if w in text_dump], "8+ characters of the secret's random part are stored"
    assert stored.key_hash == hashlib.sha256(secret.encode()).hexdigest()
    assert len(stored.prefix) <= 10  # "st_" + 7 characters, for telling keys apart in `keys list`


def test_key_hash_is_compared_in_constant_time(seeded: Seeded, monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[Any, Any]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth_module.hmac, "compare_digest", spy)
    client = seeded.app.test_client()
    assert client.get("/v1/jobs", headers=seeded.auth).status_code == 200
    digest = hashlib.sha256(seeded.auth["Authorization"].split(" ", 1)[1].encode()).hexdigest()
    assert (digest, digest) in compared
    # and the lookup itself is by the digest, never by the secret
    assert "ApiKey.key_hash == digest" in getsource(auth_module.find_key)
