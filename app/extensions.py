"""Flask extensions, created unbound and attached in create_app."""

from __future__ import annotations

import math
import time
from http import HTTPStatus
from typing import Any

from apispec import BasePlugin
from celery import Celery
from flask import Flask, current_app, g
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from flask_migrate import Migrate
from flask_smorest import Api, abort
from flask_sqlalchemy import SQLAlchemy
from kombu import Exchange, Queue
from limits import parse as parse_limit
from sqlalchemy import MetaData
from sqlalchemy.orm import DeclarativeBase

from app.schemas.common import ErrorSchema

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base of every record."""

    metadata = MetaData(naming_convention=NAMING)


def rate_limit_key() -> str:
    """Rate-limit bucket: the authenticated key's id (auth runs first), else the client address.

    The id, not the header: however a client spells the scheme or pads the secret, one key has one budget."""
    key = g.get("api_key")
    if key is not None:
        return "key:" + key.id
    return "ip:" + (get_remote_address() or "unknown")


def broker_transport_options(url: str, timeout_s: float) -> dict[str, Any]:
    """Short socket timeouts for Redis brokers (the SQLAlchemy transport takes none)."""
    if url.startswith(("redis://", "rediss://")):
        return {"socket_connect_timeout": timeout_s, "socket_timeout": timeout_s * 5}
    return {}


class CeleryClient:
    """A Celery app used only to publish tasks by name (the API never imports worker code)."""

    def init_app(self, app: Flask) -> None:
        """Create the per-app Celery client from BROKER_URL."""
        timeout = float(app.config["BROKER_TIMEOUT_S"])
        client = Celery("stabletrain-api", broker=app.config["BROKER_URL"], set_as_current=False)
        client.conf.update(
            broker_connection_timeout=timeout,
            broker_connection_retry=False,
            broker_connection_retry_on_startup=False,
            broker_transport_options=broker_transport_options(app.config["BROKER_URL"], timeout),
            # same declarations as the worker: one direct exchange per queue, routing key = queue name
            task_queues=tuple(Queue(name, Exchange(name, type="direct"), routing_key=name)
                              for name in ("train", "samples")),
            task_default_queue="train",
        )
        app.extensions["stabletrain_celery"] = client

    @property
    def app(self) -> Celery:
        """The Celery client of the current Flask app."""
        return current_app.extensions["stabletrain_celery"]

    def send_task(self, name: str, args: list[Any], queue: str) -> None:
        """Publish one task, retrying briefly so a down broker does not hang the request."""
        retries = int(current_app.config["ENQUEUE_RETRIES"])
        self.app.send_task(
            name,
            args=args,
            queue=queue,
            retry=True,
            retry_policy={"max_retries": retries, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1.0},
        )


# Errors every authenticated operation can answer, in the envelope. flask-smorest registers a response
# component per HTTP status (ErrorSchema) and keeps those an operation references; it documents 422 only.
ALWAYS = (HTTPStatus.UNAUTHORIZED, HTTPStatus.TOO_MANY_REQUESTS)
WITH_ID = (HTTPStatus.NOT_FOUND,)
WITH_BODY = (HTTPStatus.BAD_REQUEST, HTTPStatus.REQUEST_ENTITY_TOO_LARGE, HTTPStatus.UNSUPPORTED_MEDIA_TYPE)


class ErrorResponsesPlugin(BasePlugin):
    """Declares 401 and 429 on every operation, 404 where the path has an id, 400/413/415 with a body
    (409 and 416 are declared by the operations that answer them)."""

    def operation_helper(self, path: str | None = None, operations: dict[str, Any] | None = None,
                         **_kwargs: Any) -> None:
        for method, operation in (operations or {}).items():
            wanted = list(ALWAYS) + (list(WITH_ID) if "{" in (path or "") else [])
            if "requestBody" in operation or method in ("put", "patch"):
                wanted += WITH_BODY
            responses = operation.setdefault("responses", {})
            for status in wanted:
                responses.setdefault(str(status.value), status.name)


class StableTrainApi(Api):
    """flask-smorest Api whose documented error responses use our envelope."""

    ERROR_SCHEMA = ErrorSchema

    def __init__(self) -> None:
        super().__init__(spec_kwargs={"extra_plugins": [ErrorResponsesPlugin()]})


db = SQLAlchemy(model_class=Base)
migrate = Migrate()
api = StableTrainApi()


def init_limiter(app: Flask, exempt: tuple[Any, ...] = ()) -> Limiter:
    """A Limiter per app (Flask-Limiter keeps per-app state on the instance), keyed by API key."""
    limiter = Limiter(key_func=rate_limit_key)
    limiter.init_app(app)
    for blueprint in exempt:
        limiter.exempt(blueprint)
    app.extensions["stabletrain_limiter"] = limiter
    return limiter


def spend_unauthenticated() -> None:
    """Count a request that has no valid key (it is about to answer 401) against its address's budget,
    RATELIMIT_UNAUTHENTICATED in the limiter's storage; past it, 429 with Retry-After instead.

    Auth runs before the limiter, so without this a client could send bad keys without limit, each one
    a database lookup. Requests with a valid key never spend this budget, nor does it spend theirs."""
    config = current_app.config
    if not config.get("RATELIMIT_ENABLED", True):
        return
    limiter: Limiter = current_app.extensions["stabletrain_limiter"]
    item = parse_limit(str(config["RATELIMIT_UNAUTHENTICATED"]))
    bucket = (str(config.get("RATELIMIT_KEY_PREFIX") or ""), "unauthenticated", "ip:" + (get_remote_address() or "unknown"))
    if limiter.limiter.hit(item, *bucket):
        return
    reset_at, _remaining = limiter.limiter.get_window_stats(item, *bucket)
    retry_after = max(1, math.ceil(reset_at - time.time()))
    abort(429, message=f"Rate limit exceeded ({item} per address for requests without a valid API key).",
          headers={"Retry-After": str(retry_after)}, details={"limit": str(item), "scope": "unauthenticated"})
celery_client = CeleryClient()
