"""Sending webhook deliveries (Standard Webhooks) from the outbox that app.services.webhook_events fills.

A delivery is attempted by the `stabletrain.webhook_deliver` task on the `webhooks` queue:

1. claim: one conditional UPDATE takes a pending delivery that is due and moves its due time past
   the attempt's longest duration (a duplicate message, or one for a delivery not due, does nothing);
2. resolve the endpoint's host again, check every address (app.services.webhook_urls) and connect to
   the checked address: a DNS answer that changed since creation cannot aim the request inside;
3. POST the message once, signed, with short timeouts and no redirects followed;
4. record the attempt; after a failure the next attempt is due after the retry schedule's delay
   (with jitter) and the task asks Celery to run it again then (`self.retry(countdown=...)`).
   A 410 Gone is no failure to retry: the receiver asked for no more, so the endpoint is disabled
   and its pending deliveries are given up (Standard Webhooks, "sender should disable the endpoint").

The delivery's state lives in the database, so a lost broker message only delays it: the relay
(`relay_webhooks`, in every worker's relay pass) sends due deliveries that no message claimed in time.
Every attempt of a message carries the same `webhook-id` (the message id), so receivers deduplicate.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import certifi
import urllib3
from sqlalchemy import Engine, and_, delete, exists, or_, select, update
from standardwebhooks.webhooks import Webhook

from app.models import WebhookDelivery, WebhookEndpoint, WebhookMessage
from app.models.clock import db_now
from app.services.webhook_urls import Target, UnsafeUrl, check_url, flag

log = logging.getLogger(__name__)

WEBHOOK_TASK, WEBHOOK_QUEUE = "stabletrain.webhook_deliver", "webhooks"
# Standard Webhooks: a receiver answering 410 Gone wants no more messages; the endpoint is disabled
GONE = 410
# Standard Webhooks' suggested schedule: attempts at once, then after 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h
DEFAULT_SCHEDULE_S = (5, 300, 1800, 7200, 18000, 36000, 36000)
JITTER = 0.2  # each delay is drawn from [1 - JITTER, 1 + JITTER] x its value: retries of many receivers spread out
ATTEMPT_LOG_SIZE = 20
RESPONSE_EXCERPT_BYTES = 200
BATCH = 100
USER_AGENT = "StableTrain-Webhooks/1"

Send = Callable[[str, str, str], None]


@dataclass(frozen=True)
class WebhookSettings:
    """Delivery knobs, from STABLETRAIN_WEBHOOK_* (see app/config.py)."""

    schedule_s: tuple[float, ...] = DEFAULT_SCHEDULE_S
    connect_timeout_s: float = 3.0
    read_timeout_s: float = 10.0
    allow_http: bool = False
    allow_private: bool = False
    resend_after_s: float = 60.0
    ca_bundle: str = ""  # PEM file of the CAs receivers' certificates must chain to; empty: certifi's
    retention_s: float = 30 * 86400.0  # messages older than this (none of their deliveries pending) are deleted

    @property
    def ca_certs(self) -> str:
        return self.ca_bundle or certifi.where()

    @property
    def claim_s(self) -> float:
        """How long a claimed attempt may take before the relay may send the delivery again."""
        return self.connect_timeout_s + self.read_timeout_s + 30.0


def parse_schedule(value: Any) -> tuple[float, ...]:
    """A retry schedule from a JSON list or a comma-separated string of seconds."""
    if value in (None, ""):
        return DEFAULT_SCHEDULE_S
    items = value if isinstance(value, (list, tuple)) else str(value).strip("[] ").split(",")
    schedule = tuple(float(item) for item in items if str(item).strip())
    if any(delay < 0 for delay in schedule):
        raise ValueError(f"STABLETRAIN_WEBHOOK_RETRY_SCHEDULE has a negative delay: {value!r}")
    return schedule


def webhook_settings(config: Mapping[str, Any]) -> WebhookSettings:
    """Settings from the Flask config (which holds the STABLETRAIN_* environment)."""
    return WebhookSettings(
        schedule_s=parse_schedule(config.get("WEBHOOK_RETRY_SCHEDULE")),
        connect_timeout_s=float(config.get("WEBHOOK_CONNECT_TIMEOUT_S", 3.0)),
        read_timeout_s=float(config.get("WEBHOOK_TIMEOUT_S", 10.0)),
        allow_http=flag(config.get("WEBHOOK_ALLOW_HTTP", False)),
        allow_private=flag(config.get("WEBHOOK_ALLOW_PRIVATE", False)),
        resend_after_s=float(config.get("WEBHOOK_RESEND_AFTER_S", 60.0)),
        ca_bundle=str(config.get("WEBHOOK_CA_BUNDLE") or ""),
        retention_s=float(config.get("WEBHOOK_RETENTION_DAYS", 30.0)) * 86400.0,
    )


def retry_delay_s(failed_attempts: int, schedule: Sequence[float], rng: random.Random | None = None) -> float | None:
    """Seconds until the next attempt after `failed_attempts` failures, with jitter; None when the schedule is spent."""
    if failed_attempts < 1 or failed_attempts > len(schedule):
        return None
    return schedule[failed_attempts - 1] * (rng or random).uniform(1 - JITTER, 1 + JITTER)


@dataclass(frozen=True)
class Claimed:
    """What one attempt needs, read in the claim's transaction."""

    delivery_id: str
    message_id: str
    endpoint_id: str
    url: str
    secret: str
    payload: dict[str, Any]
    attempts: int
    log: list[dict[str, Any]]


def claim_delivery(engine: Engine, delivery_id: str, claim_s: float) -> Claimed | None:
    """Take a pending, due delivery for one attempt; None when it is not due, done, or gone.

    A delivery of a disabled endpoint (recorded just before the 410 that disabled it) fails instead."""
    due = and_(WebhookDelivery.id == delivery_id, WebhookDelivery.status == "pending",
               WebhookDelivery.next_attempt_at <= db_now(1.0))  # a second early: a retry message's clock
    with engine.begin() as conn:
        taken = conn.execute(update(WebhookDelivery).where(due).values(
            next_attempt_at=db_now(claim_s), enqueued_at=db_now(claim_s))).rowcount
        if not taken:
            return None
        row = conn.execute(
            select(WebhookDelivery.message_id, WebhookDelivery.endpoint_id, WebhookDelivery.attempts,
                   WebhookDelivery.log, WebhookEndpoint.url, WebhookEndpoint.secret, WebhookEndpoint.disabled_reason,
                   WebhookEndpoint.disabled_at, WebhookMessage.payload)
            .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
            .join(WebhookMessage, WebhookMessage.id == WebhookDelivery.message_id)
            .where(WebhookDelivery.id == delivery_id)).one()
        if row.disabled_at is not None:
            conn.execute(update(WebhookDelivery).where(WebhookDelivery.id == delivery_id)
                         .values(**given_up(f"not sent: the endpoint is disabled ({row.disabled_reason})")))
            return None
    return Claimed(delivery_id, row.message_id, row.endpoint_id, row.url, row.secret, dict(row.payload),
                   int(row.attempts), list(row.log or []))


def given_up(error: str | None) -> dict[str, Any]:
    """The values of a delivery that will not be attempted again."""
    return {"status": "failed", "last_error": error, "next_attempt_at": None, "enqueued_at": None}


def disable_endpoint(conn: Any, endpoint_id: str, reason: str) -> int:
    """Disable an endpoint (its receiver answered 410 Gone) and give up its other pending deliveries;
    returns how many were given up. Nothing is recorded for it until it is enabled again."""
    conn.execute(update(WebhookEndpoint).where(WebhookEndpoint.id == endpoint_id,
                                               WebhookEndpoint.disabled_at.is_(None))
                 .values(disabled_at=datetime.now(timezone.utc), disabled_reason=reason))
    return conn.execute(update(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint_id,
                                                      WebhookDelivery.status == "pending")
                        .values(**given_up(f"not sent: the endpoint is disabled ({reason})"))).rowcount


def signed_headers(secret: str, message_id: str, body: str, moment: datetime | None = None) -> dict[str, str]:
    """The Standard Webhooks headers: id, timestamp (unix seconds) and `v1,<base64 HMAC-SHA256>` signature.

    Signed by the reference library (standardwebhooks) over `id.timestamp.body` with the secret's
    decoded bytes."""
    moment = (moment or datetime.now(timezone.utc)).replace(microsecond=0)
    return {"webhook-id": message_id, "webhook-timestamp": str(int(moment.timestamp())),
            "webhook-signature": Webhook(secret).sign(message_id, moment, body)}


def host_header(target: Target) -> str:
    """The Host header for the URL's own host (brackets for an IPv6 literal, the port when not the default)."""
    host = f"[{target.host}]" if ":" in target.host else target.host
    default = 443 if target.scheme == "https" else 80
    return host if target.port == default else f"{host}:{target.port}"


def post_to(target: Target, body: bytes, headers: dict[str, str], settings: WebhookSettings) -> tuple[int, bytes]:
    """POST once to the checked address; (status, start of the response body). Redirects are answers, not
    followed; no retries here (the schedule retries).

    urllib3 directly (not requests): the connection must go to the address that was checked while TLS
    and the Host header name the URL's host, which urllib3's pool takes as `server_hostname` and
    `assert_hostname`; requests has no per-request way to pin the address."""
    timeout = urllib3.Timeout(connect=settings.connect_timeout_s, read=settings.read_timeout_s)
    common: dict[str, Any] = {"host": target.address, "port": target.port, "timeout": timeout, "retries": False,
                              "maxsize": 1}
    if target.scheme == "https":
        pool: urllib3.HTTPConnectionPool = urllib3.HTTPSConnectionPool(
            **common, server_hostname=target.host, assert_hostname=target.host, cert_reqs="CERT_REQUIRED",
            ca_certs=settings.ca_certs)
    else:
        pool = urllib3.HTTPConnectionPool(**common)
    with pool:
        response = pool.urlopen("POST", target.path, body=body, headers={**headers, "Host": host_header(target)},
                                redirect=False, retries=False, preload_content=False, assert_same_host=False)
        try:
            return response.status, response.read(RESPONSE_EXCERPT_BYTES)
        finally:
            response.release_conn()


@dataclass(frozen=True)
class Outcome:
    """One attempt's result."""

    status_code: int | None
    error: str | None
    duration_ms: int

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def attempt(claimed: Claimed, settings: WebhookSettings) -> Outcome:
    """Check the URL again (resolving the host now) and POST the message once."""
    started = time.monotonic()
    body = json.dumps(claimed.payload, separators=(",", ":"))
    try:
        target = check_url(claimed.url, allow_http=settings.allow_http, allow_private=settings.allow_private)
        headers = {"content-type": "application/json", "user-agent": USER_AGENT,
                   **signed_headers(claimed.secret, claimed.message_id, body)}
        status, excerpt = post_to(target, body.encode("utf-8"), headers, settings)
    except UnsafeUrl as exc:
        return Outcome(None, f"not sent: the URL {exc}", elapsed_ms(started))
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        return Outcome(None, f"{type(exc).__name__}: {exc}"[:500], elapsed_ms(started))
    except Exception as exc:  # a bug must spend the schedule like any failure, not loop through the relay forever
        log.exception("webhook delivery %s: unexpected error", claimed.delivery_id)
        return Outcome(None, f"internal error: {type(exc).__name__}"[:500], elapsed_ms(started))
    error = None if 200 <= status < 300 else f"HTTP {status}: {excerpt.decode('utf-8', 'replace')}".strip()
    return Outcome(status, error, elapsed_ms(started))


def elapsed_ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def record_attempt(engine: Engine, claimed: Claimed, outcome: Outcome, settings: WebhookSettings,
                   rng: random.Random | None = None) -> float | None:
    """Store the attempt; returns the delay until the next one (None: delivered, or the schedule is spent)."""
    attempts = claimed.attempts + 1
    now = datetime.now(timezone.utc)
    entry = {"at": now.isoformat(), "status_code": outcome.status_code, "error": outcome.error,
             "duration_ms": outcome.duration_ms}
    values: dict[str, Any] = {"attempts": attempts, "last_attempt_at": now, "last_status_code": outcome.status_code,
                              "last_error": outcome.error, "log": [*claimed.log, entry][-ATTEMPT_LOG_SIZE:]}
    gone = outcome.status_code == GONE
    delay = None if outcome.ok or gone else retry_delay_s(attempts, settings.schedule_s, rng)
    if outcome.ok:
        values.update(status="succeeded", delivered_at=now, next_attempt_at=None, enqueued_at=None)
    elif delay is None:
        values.update(given_up(outcome.error))
    else:  # the Celery retry's message is due then; the relay steps in only if it never arrives
        values.update(next_attempt_at=db_now(delay), enqueued_at=db_now(delay))
    # the row as this attempt claimed it (no other attempt recorded since); a success also lands on a row
    # that a 410 from a parallel attempt to the same endpoint gave up meanwhile: it did arrive
    lands = WebhookDelivery.status.in_(("pending", "failed")) if outcome.ok else WebhookDelivery.status == "pending"
    with engine.begin() as conn:
        conn.execute(update(WebhookDelivery).where(WebhookDelivery.id == claimed.delivery_id,
                                                   WebhookDelivery.attempts == claimed.attempts, lands)
                     .values(**values))
        if gone:
            dropped = disable_endpoint(conn, claimed.endpoint_id, f"the receiver answered 410 Gone at {now.isoformat()}")
            log.warning("webhook endpoint %s answered 410 Gone: disabled, %d pending deliveries given up",
                        claimed.endpoint_id, dropped)
    return delay


def deliver(engine: Engine, delivery_id: str, settings: WebhookSettings) -> tuple[str, float | None]:
    """One attempt of a delivery if it is due: (what happened, seconds until the next attempt or None)."""
    claimed = claim_delivery(engine, delivery_id, settings.claim_s)
    if claimed is None:
        return "skipped", None
    outcome = attempt(claimed, settings)
    delay = record_attempt(engine, claimed, outcome, settings)
    if outcome.ok:
        return "delivered", None
    log.info("webhook delivery %s (message %s) attempt %d failed: %s; %s", delivery_id, claimed.message_id,
             claimed.attempts + 1, outcome.error,
             "giving up" if delay is None else f"next attempt in {delay:.1f} s")
    return ("failed" if delay is None else "retrying"), delay


def relay_webhooks(engine: Engine, send: Send, resend_after_s: float) -> int:
    """Send due deliveries that have no message, or whose message is overdue by `resend_after_s` (lost with
    a broker, or its worker died mid-attempt). Stamped first, conditionally: one relay sends each."""
    # due with 10 ms to spare: SQLite's clock has milliseconds and a new row's time has microseconds, so a
    # delivery recorded within the same millisecond would not be "due" until the next pass (the claim
    # allows a second early, so this sends nothing too soon)
    waiting = and_(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= db_now(0.01),
                   or_(WebhookDelivery.enqueued_at.is_(None), WebhookDelivery.enqueued_at < db_now(-resend_after_s)))
    with engine.connect() as conn:
        ids = conn.execute(select(WebhookDelivery.id).where(waiting)
                           .order_by(WebhookDelivery.next_attempt_at).limit(BATCH)).scalars().all()
    sent = 0
    for delivery_id in ids:
        with engine.begin() as conn:
            won = conn.execute(update(WebhookDelivery).where(WebhookDelivery.id == delivery_id, waiting)
                               .values(enqueued_at=db_now())).rowcount
        if not won:
            continue
        try:
            send(WEBHOOK_TASK, delivery_id, WEBHOOK_QUEUE)
            sent += 1
        except Exception as exc:  # broker down: unstamp, the next pass tries again
            log.warning("sending webhook delivery %s failed: %s", delivery_id, exc)
            with engine.begin() as conn:
                conn.execute(update(WebhookDelivery).where(WebhookDelivery.id == delivery_id,
                                                           WebhookDelivery.status == "pending")
                             .values(enqueued_at=None))
            break
    return sent


def prune_webhook_messages(engine: Engine, retention_s: float, batch: int = 1000, max_batches: int = 10) -> int:
    """Delete messages older than `retention_s` whose deliveries are all done (succeeded or failed), with
    their delivery logs, oldest first, `batch` per transaction and at most `max_batches` per call (the
    caller is a reconciler pass: a long backlog goes over several passes, never holding up the requeues);
    returns how many messages went.

    Without this the outbox grows by a row per event and endpoint for as long as the service runs. A
    message with a delivery still pending is kept whatever its age (the schedule spans ~28 h, retention
    days), so nothing is dropped before its last attempt."""
    pending = exists().where(WebhookDelivery.message_id == WebhookMessage.id, WebhookDelivery.status == "pending")
    old = (select(WebhookMessage.id).where(WebhookMessage.created_at < db_now(-retention_s), ~pending)
           .order_by(WebhookMessage.created_at).limit(batch))
    pruned = 0
    for _ in range(max_batches):
        with engine.begin() as conn:
            ids = conn.execute(old).scalars().all()
            if not ids:
                break
            conn.execute(delete(WebhookDelivery).where(WebhookDelivery.message_id.in_(ids)))
            conn.execute(delete(WebhookMessage).where(WebhookMessage.id.in_(ids)))
        pruned += len(ids)
        log.info("webhooks: deleted %d messages older than %g days with their delivery logs", len(ids),
                 retention_s / 86400)
    return pruned
