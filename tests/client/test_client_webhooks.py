"""`stabletrain webhooks add|list|rm|deliveries|enable` and the client's webhook calls against the real API."""

from __future__ import annotations

import json
from collections.abc import Callable

from flask import Flask

from app.extensions import db
from app.models import WebhookEndpoint, utcnow
from stabletrain import ApiError, Client
from tests.client.conftest import run_cli

MakeClient = Callable[..., Client]
PUBLIC_URL = "https://93.184.215.14/hooks"  # a literal public address: no DNS needed
TEXT = "the quick brown fox jumps over the lazy dog. " * 200


def test_webhook_commands_add_list_deliveries_and_rm(api_url: str, api_key: str,
                                                     make_client: MakeClient) -> None:
    connection = ("--url", api_url, "--key", api_key)
    added = run_cli("webhooks", "add", PUBLIC_URL, "--events", "job.queued", "job.failed", "--json", *connection)
    assert added.rc == 0, added.err
    webhook = json.loads(added.out)
    assert webhook["secret"].startswith("whsec_") and webhook["events"] == ["job.failed", "job.queued"]

    listed = run_cli("webhooks", "list", *connection)
    assert listed.rc == 0 and webhook["id"] in listed.out and "whsec_" not in listed.out

    client = make_client(api_url, api_key)
    job = client.submit({"name": "c", "training": {"max_steps": 10, "seq_len": 16}},
                        dataset_id=client.upload_text(TEXT)["id"])
    log = run_cli("webhooks", "deliveries", webhook["id"], *connection)
    assert log.rc == 0, log.err
    (line,) = log.out.strip().splitlines()
    assert "job.queued" in line and "pending" in line and "attempts 0" in line and "next " in line
    (delivery,) = client.webhook_deliveries(webhook["id"])
    assert delivery["status"] == "pending" and delivery["webhook_id"].startswith("msg_")
    assert job["status"] == "queued"

    removed = run_cli("webhooks", "rm", webhook["id"], *connection)
    assert removed.rc == 0 and f"{webhook['id']} deleted" in removed.out
    assert list(client.webhooks()) == []


def test_a_disabled_endpoint_is_listed_as_such_and_enabled_again(app: Flask, api_url: str, api_key: str,
                                                                 make_client: MakeClient) -> None:
    connection = ("--url", api_url, "--key", api_key)
    client = make_client(api_url, api_key)
    webhook = client.add_webhook(PUBLIC_URL, ["job.queued"])
    with app.app_context():  # as the sender leaves it after a 410 Gone
        endpoint = db.session.get(WebhookEndpoint, webhook["id"])
        endpoint.disabled_at, endpoint.disabled_reason = utcnow(), "the receiver answered 410 Gone at noon"
        db.session.commit()
    listed = run_cli("webhooks", "list", *connection)
    assert listed.rc == 0 and "DISABLED: the receiver answered 410 Gone at noon" in listed.out

    enabled = run_cli("webhooks", "enable", webhook["id"], *connection)
    assert enabled.rc == 0 and f"{webhook['id']} enabled" in enabled.out, enabled.err
    assert client.webhook(webhook["id"])["disabled_at"] is None
    assert "DISABLED" not in run_cli("webhooks", "list", *connection).out
    assert client.enable_webhook(webhook["id"])["disabled_reason"] is None  # again: harmless


def test_a_refused_url_exits_with_the_reason(api_url: str, api_key: str, make_client: MakeClient) -> None:
    result = run_cli("webhooks", "add", "https://169.254.169.254/latest", "--url", api_url, "--key", api_key)
    assert result.rc != 0 and "link-local" in result.err
    try:
        make_client(api_url, api_key).add_webhook("http://93.184.215.14/", ["job.queued"])
    except ApiError as exc:
        assert exc.status == 422 and "https" in " ".join(exc.field_messages())
    else:
        raise AssertionError("an http URL was accepted")


def test_the_cli_offers_exactly_the_event_types_the_api_accepts() -> None:
    # The client is its own distribution and cannot import the server's list: this keeps the two equal.
    from app.models import WEBHOOK_EVENTS as SERVER_EVENTS
    from stabletrain.cli import WEBHOOK_EVENTS as CLI_EVENTS

    assert CLI_EVENTS == SERVER_EVENTS
