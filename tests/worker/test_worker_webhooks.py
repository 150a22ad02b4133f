"""Webhook deliveries against a real receiver on 127.0.0.1: signatures, retries through an outage,
redirects, the address check at delivery time, and the events a training run records."""

from __future__ import annotations

import base64
import hashlib
import hmac
import random
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, insert, select, update

from app.models import Job, WebhookDelivery, WebhookEndpoint, WebhookMessage, new_id
from app.services.webhook_events import record_job_event, worsened_findings
from app.services.webhooks import new_webhook_secret
from tests.worker.jobfactory import make_job
from tests.worker.webhook_receiver import Receiver, self_signed
from worker.db import utcnow
from worker.leases import claim_job, release_job
from worker.reconciler import requeue_expired
from worker.reporting import DbReporter
from worker.service import run_train_job
from worker.settings import WorkerSettings
from worker.testing import wait_for
from worker.webhooks import (
    DEFAULT_SCHEDULE_S,
    JITTER,
    WEBHOOK_QUEUE,
    WEBHOOK_TASK,
    Outcome,
    WebhookSettings,
    claim_delivery,
    deliver,
    parse_schedule,
    prune_webhook_messages,
    record_attempt,
    relay_webhooks,
    retry_delay_s,
    signed_headers,
    webhook_settings,
)

# tiny delays: a test walks the whole schedule in well under a second
FAST = WebhookSettings(schedule_s=(0.05, 0.05, 0.1, 0.1, 0.2, 0.2, 0.2), connect_timeout_s=1.0, read_timeout_s=2.0,
                       allow_http=True, allow_private=True, resend_after_s=0.0)


@pytest.fixture
def secret() -> str:
    return new_webhook_secret()


@pytest.fixture
def receiver(secret: str) -> Iterator[Receiver]:
    server = Receiver(secret).start()
    yield server
    server.stop()


def add_endpoint(engine: Engine, owner_id: str, url: str, secret: str, events: list[str] | None = None) -> str:
    endpoint_id = new_id("wh")
    with engine.begin() as conn:
        conn.execute(insert(WebhookEndpoint).values(
            id=endpoint_id, owner_id=owner_id, url=url, secret=secret, created_at=utcnow(),
            events=events or ["job.queued", "job.running", "job.succeeded", "job.failed", "job.cancelled",
                              "job.health_changed", "checkpoint.created"]))
    return endpoint_id


def owner_of(engine: Engine, job_id: str) -> str:
    with engine.connect() as conn:
        return conn.execute(select(Job.owner_id).where(Job.id == job_id)).scalar_one()


def deliveries(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return conn.execute(select(WebhookDelivery).order_by(WebhookDelivery.created_at,
                                                             WebhookDelivery.id)).all()


def pump(engine: Engine, settings: WebhookSettings = FAST) -> list[tuple[str, float | None]]:
    """One relay pass, then each message it sent run as the task would run it (no broker in between)."""
    sent: list[str] = []

    def send(task: str, delivery_id: str, queue: str) -> None:
        assert (task, queue) == (WEBHOOK_TASK, WEBHOOK_QUEUE)
        sent.append(delivery_id)

    relay_webhooks(engine, send, settings.resend_after_s)
    return [deliver(engine, delivery_id, settings) for delivery_id in sent]


def queued_event(engine: Engine, job_id: str) -> str:
    with engine.begin() as conn:
        message_id = record_job_event(conn, job_id, "job.queued")
    assert message_id is not None
    return message_id


def test_signature_is_v1_base64_hmac_of_id_timestamp_body_with_the_decoded_secret(secret: str) -> None:
    moment = datetime(2026, 12, 3, 12, 0, 7, 900000, tzinfo=timezone.utc)
    body = '{"type":"job.queued","timestamp":"2026-12-03T12:00:07.900Z","data":{}}'
    headers = signed_headers(secret, "msg_0123456789abcdef01234567", body, moment)
    assert headers["webhook-id"] == "msg_0123456789abcdef01234567"
    assert headers["webhook-timestamp"] == str(int(moment.replace(microsecond=0).timestamp()))
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"msg_0123456789abcdef01234567.{headers['webhook-timestamp']}.{body}".encode()
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    assert headers["webhook-signature"] == f"v1,{expected}"


def test_retry_delays_follow_the_schedule_within_the_jitter_bounds() -> None:
    rng = random.Random(7)
    for attempt, base in enumerate(DEFAULT_SCHEDULE_S, start=1):
        draws = [retry_delay_s(attempt, DEFAULT_SCHEDULE_S, rng) for _ in range(500)]
        assert all(base * (1 - JITTER) <= d <= base * (1 + JITTER) for d in draws)  # type: ignore[operator]
        assert min(draws) < base * 0.9 and max(draws) > base * 1.1  # type: ignore[type-var]  # really spread
    assert retry_delay_s(len(DEFAULT_SCHEDULE_S) + 1, DEFAULT_SCHEDULE_S, rng) is None
    assert sum(DEFAULT_SCHEDULE_S) / 3600 == pytest.approx(27.6, abs=0.1)  # about a day of retries


def test_schedule_comes_from_the_config_as_a_list_or_a_comma_string() -> None:
    assert webhook_settings({}).schedule_s == DEFAULT_SCHEDULE_S
    assert webhook_settings({"WEBHOOK_RETRY_SCHEDULE": [0.1, 2]}).schedule_s == (0.1, 2.0)
    assert parse_schedule("0.5, 1,3") == (0.5, 1.0, 3.0)
    with pytest.raises(ValueError):
        parse_schedule("-1")


def test_every_event_arrives_once_through_a_receiver_outage(engine: Engine, settings: WorkerSettings,
                                                            receiver: Receiver, secret: str) -> None:
    import torch

    torch.set_num_threads(1)
    job_id = make_job(engine, settings.storage_dir)
    add_endpoint(engine, owner_of(engine, job_id), receiver.url, secret)
    queued_event(engine, job_id)
    receiver.stop()  # down for the whole run and the first attempts
    assert run_train_job(engine, job_id, settings) == "succeeded"

    results = pump(engine)
    assert results and all(outcome == "retrying" for outcome, _ in results)
    failed_once = deliveries(engine)
    assert all(d.attempts == 1 and d.status == "pending" and d.last_status_code is None for d in failed_once)
    assert all("Connection" in (d.last_error or "") or "refused" in (d.last_error or "") for d in failed_once)

    receiver.start()  # back on the same port
    wait_for(lambda: pump(engine) is not None and all(d.status == "succeeded" for d in deliveries(engine)),
             20, "every delivery to succeed")

    with engine.connect() as conn:
        messages = {m.id: m.payload for m in conn.execute(select(WebhookMessage)).all()}
    assert set(receiver.acted) == set(messages)  # every event, each webhook-id acted on once
    assert receiver.bad_signatures == 0
    types = sorted(p["type"] for p in receiver.acted.values())
    assert types.count("job.queued") == 1 and types.count("job.running") == 1
    assert types.count("job.succeeded") == 1
    checkpoint_steps = sorted(p["data"]["checkpoint"]["step"] for p in receiver.acted.values()
                              if p["type"] == "checkpoint.created")
    assert checkpoint_steps == [5, 10, 12]
    assert all(p["data"]["job_id"] == job_id for p in receiver.acted.values())
    final = next(p for p in receiver.acted.values() if p["type"] == "job.succeeded")
    assert final["data"]["status"] == "succeeded" and final["data"]["step"] == 12
    assert all(d.attempts == 2 and d.last_status_code == 204 and d.delivered_at for d in deliveries(engine))
    assert [entry["status_code"] for entry in deliveries(engine)[0].log] == [None, 204]


def test_retries_carry_the_same_webhook_id_and_stop_when_the_schedule_is_spent(
        engine: Engine, settings: WorkerSettings, receiver: Receiver, secret: str) -> None:
    job_id = make_job(engine)
    add_endpoint(engine, owner_of(engine, job_id), receiver.url, secret)
    message_id = queued_event(engine, job_id)
    receiver.answer = 500
    short = WebhookSettings(**{**FAST.__dict__, "schedule_s": (0.05, 0.05)})
    wait_for(lambda: pump(engine, short) is not None and deliveries(engine)[0].status == "failed", 10,
             "the schedule to run out")
    (delivery,) = deliveries(engine)
    assert delivery.attempts == 3 and delivery.last_status_code == 500 and delivery.next_attempt_at is None
    assert [entry["status_code"] for entry in delivery.log] == [500, 500, 500]
    ids = [r["headers"]["webhook-id"] for r in receiver.requests]
    assert ids == [message_id] * 3
    assert pump(engine, short) == []  # nothing more is sent


def test_a_410_gone_disables_the_endpoint_and_gives_up_its_pending_deliveries(
        engine: Engine, receiver: Receiver, secret: str) -> None:
    job_id = make_job(engine)
    endpoint_id = add_endpoint(engine, owner_of(engine, job_id), receiver.url, secret)
    other_id = add_endpoint(engine, owner_of(engine, job_id), receiver.url + "?other", secret)
    queued_event(engine, job_id)  # one delivery to each endpoint
    receiver.answer = 410
    relay_webhooks(engine, lambda *_: None, FAST.resend_after_s)  # both now have a message in flight
    gone = next(d.id for d in deliveries(engine) if d.endpoint_id == endpoint_id)
    assert deliver(engine, gone, FAST) == ("failed", None)  # no retry is scheduled for a 410
    with engine.connect() as conn:
        endpoint = conn.execute(select(WebhookEndpoint).where(WebhookEndpoint.id == endpoint_id)).one()
    assert endpoint.disabled_at is not None and "410 Gone" in endpoint.disabled_reason
    by_endpoint = {d.endpoint_id: d for d in deliveries(engine)}
    assert by_endpoint[endpoint_id].status == "failed" and by_endpoint[endpoint_id].last_status_code == 410
    assert by_endpoint[other_id].status == "pending"  # another endpoint's receiver decides for itself

    with engine.begin() as conn:  # a pending delivery recorded the instant before the 410 was stored
        conn.execute(insert(WebhookDelivery).values(
            id=new_id("dlv"), message_id=by_endpoint[endpoint_id].message_id, endpoint_id=endpoint_id,
            event_type="job.queued", status="pending", attempts=0, next_attempt_at=utcnow(), created_at=utcnow()))
    requests_before = len(receiver.requests)
    receiver.answer = 204
    pump(engine)
    assert len(receiver.requests) == requests_before + 1  # only the other endpoint's delivery went out
    late = [d for d in deliveries(engine) if d.endpoint_id == endpoint_id and d.attempts == 0]
    assert [(d.status, d.last_error.startswith("not sent: the endpoint is disabled")) for d in late] == [
        ("failed", True)]
    with engine.begin() as conn:  # and nothing is recorded for it from now on
        record_job_event(conn, job_id, "job.succeeded")
    assert {d.endpoint_id for d in deliveries(engine) if d.event_type == "job.succeeded"} == {other_id}


def test_redirects_are_answers_not_followed(engine: Engine, receiver: Receiver, secret: str) -> None:
    job_id = make_job(engine)
    add_endpoint(engine, owner_of(engine, job_id), receiver.url, secret)
    queued_event(engine, job_id)
    receiver.answer = 302
    assert pump(engine) == [("retrying", pytest.approx(0.05, rel=JITTER))]
    assert receiver.paths() == ["/hook"]  # /elsewhere never asked
    (delivery,) = deliveries(engine)
    assert delivery.last_status_code == 302 and delivery.status == "pending"


def test_a_host_resolving_to_a_private_address_at_delivery_is_not_contacted(
        engine: Engine, receiver: Receiver, secret: str) -> None:
    """Accepted while private addresses were allowed; at delivery time the same name resolves to loopback
    and the server refuses it: the receiver sees no request at all."""
    job_id = make_job(engine)
    add_endpoint(engine, owner_of(engine, job_id), f"http://localhost:{receiver.port}/hook", secret)
    queued_event(engine, job_id)
    strict = WebhookSettings(**{**FAST.__dict__, "allow_private": False})
    assert [outcome for outcome, _ in pump(engine, strict)] == ["retrying"]
    assert receiver.requests == []
    (delivery,) = deliveries(engine)
    assert "loopback" in delivery.last_error and delivery.last_status_code is None


def test_https_goes_to_the_checked_address_with_the_urls_name_for_tls(engine: Engine, secret: str,
                                                                     tmp_path: Path) -> None:
    """The connection goes to the address resolved and checked (127.0.0.1) while TLS verifies the
    certificate against the URL's host name; a certificate for another name is refused."""
    ca, cert, key = self_signed(tmp_path, "localhost")
    server = Receiver(secret, tls=(cert, key)).start()
    try:
        job_id = make_job(engine)
        add_endpoint(engine, owner_of(engine, job_id), f"https://localhost:{server.port}/hook", secret)
        queued_event(engine, job_id)
        trusted = WebhookSettings(**{**FAST.__dict__, "ca_bundle": ca})
        assert pump(engine, trusted) == [("delivered", None)]
        assert len(server.acted) == 1 and server.requests[0]["headers"]["host"] == f"localhost:{server.port}"

        (tmp_path / "other").mkdir()
        other_ca, _, _ = self_signed(tmp_path / "other", "localhost")  # a CA that did not sign the receiver's
        queued_event(engine, job_id)
        untrusted = WebhookSettings(**{**FAST.__dict__, "ca_bundle": other_ca})
        assert [outcome for outcome, _ in pump(engine, untrusted)] == ["retrying"]
        assert "certificate" in deliveries(engine)[-1].last_error.lower()
        assert len(server.acted) == 1
    finally:
        server.stop()


def test_a_duplicate_message_claims_nothing(engine: Engine, receiver: Receiver, secret: str) -> None:
    job_id = make_job(engine)
    add_endpoint(engine, owner_of(engine, job_id), receiver.url, secret)
    queued_event(engine, job_id)
    (delivery,) = deliveries(engine)
    assert deliver(engine, delivery.id, FAST) == ("delivered", None)
    assert deliver(engine, delivery.id, FAST) == ("skipped", None)  # the same message delivered twice
    assert len(receiver.requests) == 1


def test_relay_sends_a_due_delivery_once_until_its_message_is_overdue(engine: Engine, secret: str) -> None:
    job_id = make_job(engine)
    add_endpoint(engine, owner_of(engine, job_id), "https://93.184.215.14/hook", secret)
    queued_event(engine, job_id)
    sent: list[str] = []

    def send(task: str, delivery_id: str, queue: str) -> None:
        sent.append(delivery_id)

    assert relay_webhooks(engine, send, resend_after_s=3600) == 1
    assert relay_webhooks(engine, send, resend_after_s=3600) == 0  # its message is in flight
    with engine.begin() as conn:  # the message was sent two hours ago and never claimed: lost
        conn.execute(update(WebhookDelivery).values(enqueued_at=datetime(2000, 1, 1, tzinfo=timezone.utc)))
    assert relay_webhooks(engine, send, resend_after_s=3600) == 1
    assert len(sent) == 2 and len(set(sent)) == 1


def test_health_changed_is_recorded_once_per_new_or_worse_finding(engine: Engine, secret: str) -> None:
    job_id = make_job(engine, status="running")
    add_endpoint(engine, owner_of(engine, job_id), "https://93.184.215.14/hook", secret, ["job.health_changed"])
    reporter = DbReporter(engine, job_id)
    stalled = {"kind": "stalled", "severity": "warning", "summary": "loss flat"}
    exploding = {"kind": "exploding", "severity": "warning", "summary": "spikes"}
    reporter.on_diagnosis([stalled], "s")
    reporter.on_diagnosis([stalled], "s")  # unchanged: nothing
    reporter.on_diagnosis([{**exploding, "severity": "critical"}, stalled], "s")  # new kind
    reporter.on_diagnosis([{**stalled, "severity": "critical"}], "s")  # worse
    reporter.on_diagnosis([{**stalled, "severity": "warning"}], "s")  # better: nothing
    with engine.connect() as conn:
        payloads = [m.payload for m in conn.execute(select(WebhookMessage)
                                                    .order_by(WebhookMessage.created_at)).all()]
    assert [(p["data"]["finding"]["kind"], p["data"]["finding"]["severity"]) for p in payloads] == [
        ("stalled", "warning"), ("exploding", "critical"), ("stalled", "critical")]
    assert [p["data"]["health"] for p in payloads] == ["warning", "critical", "critical"]


def test_worsened_findings_compares_by_kind_and_severity() -> None:
    old = {"findings": [{"kind": "a", "severity": "warning"}, {"kind": "b", "severity": "critical"}]}
    new = [{"kind": "a", "severity": "critical"}, {"kind": "b", "severity": "warning"}, {"kind": "c",
                                                                                        "severity": "info"}]
    assert [f["kind"] for f in worsened_findings(old, new)] == ["a", "c"]
    assert worsened_findings(None, []) == []


def test_old_finished_messages_are_pruned_with_their_logs_and_pending_ones_kept(engine: Engine) -> None:
    job_id = make_job(engine)
    owner = owner_of(engine, job_id)
    endpoint_id = add_endpoint(engine, owner, "https://93.184.215.14/hooks", new_webhook_secret())
    now = utcnow()
    ages = {"old-succeeded": 40, "old-failed": 31, "old-pending": 45, "recent": 2}  # days
    statuses = {"old-succeeded": "succeeded", "old-failed": "failed", "old-pending": "pending", "recent": "succeeded"}
    ids = {name: new_id("msg") for name in ages}
    with engine.begin() as conn:
        for name, days in ages.items():
            created = now - timedelta(days=days)
            conn.execute(insert(WebhookMessage).values(id=ids[name], owner_id=owner, event_type="job.queued",
                                                       payload={"type": "job.queued"}, created_at=created))
            conn.execute(insert(WebhookDelivery).values(
                id=new_id("dlv"), message_id=ids[name], endpoint_id=endpoint_id, event_type="job.queued",
                status=statuses[name], attempts=1, next_attempt_at=now, created_at=created))
    assert prune_webhook_messages(engine, retention_s=30 * 86400, batch=1, max_batches=1) == 1  # capped per call
    assert prune_webhook_messages(engine, retention_s=30 * 86400, batch=1) == 1  # the rest on the next call
    with engine.connect() as conn:
        kept = set(conn.execute(select(WebhookMessage.id)).scalars())
        logged = set(conn.execute(select(WebhookDelivery.message_id)).scalars())
    assert kept == logged == {ids["old-pending"], ids["recent"]}
    assert prune_webhook_messages(engine, retention_s=30 * 86400) == 0


def test_a_job_back_in_the_queue_says_so_once_per_return(engine: Engine) -> None:
    """A worker that died (reconciler requeue) or shut down (hand-back): job.queued each time, so a
    consumer's state follows queued -> running -> queued -> running instead of seeing running twice."""
    job_id = make_job(engine)
    add_endpoint(engine, owner_of(engine, job_id), "https://93.184.215.14/hooks", new_webhook_secret(),
                 events=["job.queued", "job.running"])
    def sent() -> list[tuple[str, str]]:
        with engine.connect() as conn:
            rows = conn.execute(select(WebhookMessage.event_type, WebhookMessage.payload)).all()
        return sorted((event, payload["data"]["status"]) for event, payload in rows)

    lease = claim_job(engine, job_id, "worker-a", lease_s=30)
    assert lease is not None and sent() == [("job.running", "running")]
    assert release_job(engine, lease, "worker shutting down")  # hand-back
    assert sent() == [("job.queued", "queued"), ("job.running", "running")]
    lease = claim_job(engine, job_id, "worker-b", lease_s=30)
    assert lease is not None
    with engine.begin() as conn:  # worker-b dies: its lease runs out
        conn.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(seconds=5)))
    assert requeue_expired(engine, utcnow()) == [job_id]
    assert sent() == [("job.queued", "queued")] * 2 + [("job.running", "running")] * 2


def test_a_success_in_flight_when_a_410_disables_its_endpoint_still_counts(engine: Engine, secret: str) -> None:
    job_id = make_job(engine)
    add_endpoint(engine, owner_of(engine, job_id), "https://93.184.215.14/hooks", secret)
    queued_event(engine, job_id)
    with engine.begin() as conn:
        record_job_event(conn, job_id, "job.succeeded")
    first, second = (d.id for d in deliveries(engine))
    in_flight = claim_delivery(engine, first, FAST.claim_s)
    gone = claim_delivery(engine, second, FAST.claim_s)
    assert in_flight is not None and gone is not None
    record_attempt(engine, gone, Outcome(410, "HTTP 410: gone", 3), FAST)  # disables, gives up `first`
    assert {d.id: d.status for d in deliveries(engine)} == {first: "failed", second: "failed"}
    record_attempt(engine, in_flight, Outcome(204, None, 5), FAST)  # the receiver took it before its 410
    landed = next(d for d in deliveries(engine) if d.id == first)
    assert (landed.status, landed.last_status_code, landed.attempts) == ("succeeded", 204, 1)
