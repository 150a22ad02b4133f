"""/v1/webhooks: creation (secret, URL checks), listing, ownership, and the outbox rows job changes write."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from app.extensions import db
from app.models import WebhookDelivery, WebhookEndpoint, WebhookMessage, utcnow

PUBLIC_URL = "https://93.184.215.14/hooks"  # a literal public address: no DNS needed


def add_webhook(client: FlaskClient, auth: dict[str, str], url: str = PUBLIC_URL,
                events: list[str] | None = None) -> Any:
    return client.post("/v1/webhooks", json={"url": url, "events": events or ["job.queued", "job.succeeded"]},
                       headers=auth)


def test_create_returns_the_secret_once_and_list_hides_it(client: FlaskClient, auth: dict[str, str]) -> None:
    created = add_webhook(client, auth)
    assert created.status_code == 201, created.json
    body = created.json
    assert body["id"].startswith("wh_") and body["url"] == PUBLIC_URL
    assert body["events"] == ["job.queued", "job.succeeded"]
    assert body["secret"].startswith("whsec_")
    assert len(base64.b64decode(body["secret"].removeprefix("whsec_"), validate=True)) >= 24

    listed = client.get("/v1/webhooks", headers=auth).json
    assert [w["id"] for w in listed["items"]] == [body["id"]] and listed["next_cursor"] is None
    assert "secret" not in listed["items"][0]
    one = client.get(f"/v1/webhooks/{body['id']}", headers=auth).json
    assert one["url"] == PUBLIC_URL and "secret" not in one


def test_listing_pages_newest_first(client: FlaskClient, auth: dict[str, str]) -> None:
    ids = [add_webhook(client, auth, f"{PUBLIC_URL}/{i}").json["id"] for i in range(3)]
    first = client.get("/v1/webhooks?limit=2", headers=auth).json
    second = client.get(f"/v1/webhooks?limit=2&cursor={first['next_cursor']}", headers=auth).json
    assert [w["id"] for w in first["items"] + second["items"]] == ids[::-1]
    assert second["next_cursor"] is None


@pytest.mark.parametrize("url, words", [
    ("http://93.184.215.14/", "https"),
    ("https://127.0.0.1/", "loopback"),
    ("https://localhost:8443/x", "loopback"),
    ("https://10.1.2.3/", "private"),
    ("https://192.168.0.10/", "private"),
    ("https://169.254.169.254/latest/meta-data", "link-local"),
    ("https://[::1]/", "loopback"),
    ("https://[fe80::1]/", "link-local"),
    ("https://[fd00::1]/", "private"),
    ("https://[::ffff:10.0.0.1]/", "private"),
    ("https://[::ffff:127.0.0.1]/", "loopback"),
    ("https://[2002:7f00:1::]/", "loopback"),  # 6to4 around 127.0.0.1
    ("https://100.64.0.1/", "not globally routable"),  # carrier-grade NAT
    ("https://0.0.0.0/", "0.0.0.0"),
    ("https://224.0.0.1/", "multicast"),
    ("https://user:pw@93.184.215.14/", "credentials"),
    ("ftp://93.184.215.14/", "https"),
    ("https:///nohost", "host"),
])
def test_unsafe_urls_are_refused_with_the_reason(client: FlaskClient, auth: dict[str, str], url: str,
                                                 words: str) -> None:
    response = add_webhook(client, auth, url)
    assert response.status_code == 422, response.json
    assert words in " ".join(response.json["error"]["details"]["url"])
    assert client.get("/v1/webhooks", headers=auth).json["items"] == []


@pytest.mark.app_config(WEBHOOK_ALLOW_HTTP=1, WEBHOOK_ALLOW_PRIVATE=1)
def test_http_and_private_hosts_are_accepted_where_the_server_allows(client: FlaskClient,
                                                                     auth: dict[str, str]) -> None:
    assert add_webhook(client, auth, "http://127.0.0.1:9/hook").status_code == 201


def test_unknown_event_types_and_empty_lists_are_refused(client: FlaskClient, auth: dict[str, str]) -> None:
    bad = add_webhook(client, auth, events=["job.exploded"])
    assert bad.status_code == 422 and "events.0" in bad.json["error"]["details"], bad.json
    empty = client.post("/v1/webhooks", json={"url": PUBLIC_URL, "events": []}, headers=auth)
    assert empty.status_code == 422


@pytest.mark.app_config(MAX_WEBHOOKS_PER_KEY=2)
def test_endpoints_per_key_are_limited(client: FlaskClient, auth: dict[str, str]) -> None:
    assert [add_webhook(client, auth).status_code for _ in range(3)] == [201, 201, 409]


def test_another_key_sees_none_of_them(client: FlaskClient, auth: dict[str, str], make_auth: Any) -> None:
    webhook_id = add_webhook(client, auth).json["id"]
    other = make_auth("other")
    assert client.get(f"/v1/webhooks/{webhook_id}", headers=other).status_code == 404
    assert client.get(f"/v1/webhooks/{webhook_id}/deliveries", headers=other).status_code == 404
    assert client.delete(f"/v1/webhooks/{webhook_id}", headers=other).status_code == 404
    assert client.get("/v1/webhooks", headers=other).json["items"] == []
    assert client.get(f"/v1/webhooks/{webhook_id}", headers=auth).status_code == 200


def outbox(app: Flask) -> list[tuple[str, str, str]]:
    """(event type, endpoint id, delivery status) of every delivery, oldest first."""
    with app.app_context():
        rows = db.session.execute(select(WebhookDelivery.event_type, WebhookDelivery.endpoint_id,
                                         WebhookDelivery.status).order_by(WebhookDelivery.created_at)).all()
        return [tuple(r) for r in rows]


def test_submit_and_cancel_record_events_for_subscribed_endpoints_only(
        app: Flask, client: FlaskClient, auth: dict[str, str], make_auth: Any, dataset: dict[str, Any],
        submit: Any) -> None:
    queued_only = add_webhook(client, auth, events=["job.queued"]).json["id"]
    cancelled_only = add_webhook(client, auth, events=["job.cancelled"]).json["id"]
    add_webhook(client, make_auth("other"), events=["job.queued", "job.cancelled"])  # another key's: never

    job = submit(auth, dataset["id"]).json
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth).status_code == 200

    assert outbox(app) == [("job.queued", queued_only, "pending"), ("job.cancelled", cancelled_only, "pending")]
    with app.app_context():
        payloads = {m.event_type: m.payload for m in db.session.execute(select(WebhookMessage)).scalars()}
    assert payloads["job.queued"]["type"] == "job.queued"
    assert payloads["job.queued"]["timestamp"].endswith("Z")
    assert payloads["job.queued"]["data"]["job_id"] == job["id"]
    assert payloads["job.queued"]["data"]["status"] == "queued"
    assert payloads["job.cancelled"]["data"]["status"] == "cancelled"

    log = client.get(f"/v1/webhooks/{queued_only}/deliveries", headers=auth).json
    assert [(d["event_type"], d["status"], d["attempts"]) for d in log["items"]] == [("job.queued", "pending", 0)]
    assert log["items"][0]["webhook_id"].startswith("msg_") and log["items"][0]["next_attempt_at"]


def test_pause_resume_and_cancel_of_a_paused_job_record_their_events(
        app: Flask, client: FlaskClient, auth: dict[str, str], dataset: dict[str, Any], submit: Any) -> None:
    hook = add_webhook(client, auth, events=["job.paused", "job.queued", "job.cancelled"]).json["id"]
    job = submit(auth, dataset["id"]).json
    assert client.post(f"/v1/jobs/{job['id']}/pause", headers=auth).json["status"] == "paused"
    assert client.post(f"/v1/jobs/{job['id']}/resume", headers=auth).json["status"] == "queued"
    assert client.post(f"/v1/jobs/{job['id']}/pause", headers=auth).status_code == 200
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth).json["status"] == "cancelled"
    # one transaction each; rows written within the same clock tick have no order between them
    assert sorted(event for event, endpoint, _ in outbox(app) if endpoint == hook) == [
        "job.cancelled", "job.paused", "job.paused", "job.queued", "job.queued"]


def test_an_owner_without_endpoints_writes_no_outbox_rows(app: Flask, auth: dict[str, str],
                                                          dataset: dict[str, Any], submit: Any) -> None:
    assert submit(auth, dataset["id"]).status_code == 202
    assert outbox(app) == []
    with app.app_context():
        assert db.session.execute(select(WebhookMessage)).first() is None


def test_deleting_an_endpoint_drops_its_pending_deliveries(app: Flask, client: FlaskClient, auth: dict[str, str],
                                                           dataset: dict[str, Any], submit: Any) -> None:
    webhook_id = add_webhook(client, auth).json["id"]
    submit(auth, dataset["id"])
    assert len(outbox(app)) == 1
    assert client.delete(f"/v1/webhooks/{webhook_id}", headers=auth).status_code == 204
    assert client.get(f"/v1/webhooks/{webhook_id}", headers=auth).status_code == 404
    assert outbox(app) == []


def test_a_disabled_endpoint_records_nothing_until_it_is_enabled_again(
        app: Flask, client: FlaskClient, auth: dict[str, str], make_auth: Any, dataset: dict[str, Any],
        submit: Any) -> None:
    webhook_id = add_webhook(client, auth).json["id"]
    assert client.get(f"/v1/webhooks/{webhook_id}", headers=auth).json["disabled_at"] is None
    with app.app_context():  # what the sender does when the receiver answers 410 Gone
        endpoint = db.session.get(WebhookEndpoint, webhook_id)
        endpoint.disabled_at, endpoint.disabled_reason = utcnow(), "the receiver answered 410 Gone at ..."
        db.session.commit()
    shown = client.get("/v1/webhooks", headers=auth).json["items"][0]
    assert shown["disabled_at"] and shown["disabled_reason"].startswith("the receiver answered 410")
    submit(auth, dataset["id"])
    assert outbox(app) == []

    assert client.post(f"/v1/webhooks/{webhook_id}/enable", headers=make_auth("other")).status_code == 404
    enabled = client.post(f"/v1/webhooks/{webhook_id}/enable", headers=auth)
    assert enabled.status_code == 200 and enabled.json["disabled_at"] is None
    assert enabled.json["disabled_reason"] is None and "secret" not in enabled.json
    assert client.post(f"/v1/webhooks/{webhook_id}/enable", headers=auth).status_code == 200  # idempotent
    submit(auth, dataset["id"])
    assert outbox(app) == [("job.queued", webhook_id, "pending")]
