"""Webhook endpoints of an API key: create (URL checked, secret shown once), list, read, delete, delivery log."""

from __future__ import annotations

import base64
import secrets
from typing import Any

from flask import current_app
from flask_smorest import abort
from sqlalchemy import func, select

from app.extensions import db
from app.models import WebhookDelivery, WebhookEndpoint
from app.services.common import get_owned, lock_owner, newest_first_page
from app.services.webhook_urls import UnsafeUrl, check_url, flag

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32  # Standard Webhooks asks for 24 to 64 random bytes


def new_webhook_secret() -> str:
    """whsec_ + base64 of fresh random bytes (the form Standard Webhooks libraries decode)."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode("ascii")


def checked_url(url: str) -> str:
    """The URL if the server may call it (app.services.webhook_urls), else 422 naming `url`."""
    cfg = current_app.config
    try:
        check_url(url, allow_http=flag(cfg["WEBHOOK_ALLOW_HTTP"]), allow_private=flag(cfg["WEBHOOK_ALLOW_PRIVATE"]))
    except UnsafeUrl as exc:
        abort(422, message=f"Validation failed: url {exc}.", details={"url": [str(exc)]})
    return url


def create_endpoint(owner_id: str, url: str, events: list[str]) -> WebhookEndpoint:
    """Record a new endpoint (409 past the per-key limit); the caller shows its secret once."""
    url = checked_url(url)
    lock_owner(owner_id)  # the count below and the insert cannot interleave with another create
    limit = int(current_app.config["MAX_WEBHOOKS_PER_KEY"])
    count = db.session.execute(select(func.count()).select_from(WebhookEndpoint)
                               .where(WebhookEndpoint.owner_id == owner_id)).scalar_one()
    if count >= limit:
        abort(409, message=f"This key already has {count} webhook endpoints (limit {limit}); delete one first.",
              details={"webhooks": count, "limit": limit})
    endpoint = WebhookEndpoint(owner_id=owner_id, url=url, events=sorted(set(events)), secret=new_webhook_secret())
    db.session.add(endpoint)
    db.session.commit()
    return endpoint


def get_endpoint(owner_id: str, endpoint_id: str) -> WebhookEndpoint:
    """The key's endpoint or 404."""
    return get_owned(WebhookEndpoint, endpoint_id, owner_id, "Webhook")


def list_endpoints(owner_id: str, limit: int, cursor: str | None) -> tuple[list[WebhookEndpoint], str | None]:
    """One page of the key's endpoints, newest first."""
    return newest_first_page(select(WebhookEndpoint).where(WebhookEndpoint.owner_id == owner_id),
                             WebhookEndpoint, limit, cursor)


def delete_endpoint(owner_id: str, endpoint_id: str) -> None:
    """Delete an endpoint; its pending deliveries go with it (nothing more is sent to it)."""
    endpoint = get_endpoint(owner_id, endpoint_id)
    db.session.delete(endpoint)
    db.session.commit()


def enable_endpoint(owner_id: str, endpoint_id: str) -> WebhookEndpoint:
    """Send to an endpoint again after its receiver disabled it (410 Gone); events from now on only.

    The URL is checked again: the rules may have changed since it was created."""
    endpoint = get_endpoint(owner_id, endpoint_id)
    checked_url(endpoint.url)
    endpoint.disabled_at = None
    endpoint.disabled_reason = None
    db.session.commit()
    return endpoint


def list_deliveries(owner_id: str, endpoint_id: str, limit: int,
                    cursor: str | None) -> tuple[list[WebhookDelivery], str | None]:
    """One page of an endpoint's delivery log, newest first."""
    endpoint = get_endpoint(owner_id, endpoint_id)
    return newest_first_page(select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint.id),
                             WebhookDelivery, limit, cursor)


def endpoint_view(endpoint: WebhookEndpoint, with_secret: bool = False) -> dict[str, Any]:
    """The public shape; the secret only in the creation answer."""
    view: dict[str, Any] = {"id": endpoint.id, "url": endpoint.url, "events": endpoint.events,
                            "created_at": endpoint.created_at, "disabled_at": endpoint.disabled_at,
                            "disabled_reason": endpoint.disabled_reason}
    if with_secret:
        view["secret"] = endpoint.secret
    return view


def delivery_view(delivery: WebhookDelivery) -> dict[str, Any]:
    """One delivery log row: the webhook-id, its attempts and what came back."""
    return {"id": delivery.id, "webhook_id": delivery.message_id, "event_type": delivery.event_type,
            "status": delivery.status, "attempts": delivery.attempts,
            "next_attempt_at": delivery.next_attempt_at if delivery.status == "pending" else None,
            "last_attempt_at": delivery.last_attempt_at, "last_status_code": delivery.last_status_code,
            "last_error": delivery.last_error, "delivered_at": delivery.delivered_at,
            "created_at": delivery.created_at, "log": delivery.log or []}
