"""API key authentication: `Authorization: Bearer <key>`, stored as sha256 hex."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from flask import Flask, g, request
from flask_smorest import abort
from sqlalchemy import select

from app.extensions import db, spend_unauthenticated
from app.models import ApiKey

PUBLIC_V1_PATHS = {"/v1/openapi.json"}


def hash_secret(secret: str) -> str:
    """sha256 hex of a key secret."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def new_secret() -> str:
    """A fresh secret: st_ + 32 random bytes, URL-safe."""
    return "st_" + secrets.token_urlsafe(32)


def find_key(secret: str) -> ApiKey | None:
    """The active key with this secret, or None."""
    digest = hash_secret(secret)
    key = db.session.execute(select(ApiKey).where(ApiKey.key_hash == digest)).scalar_one_or_none()
    if key is None or not hmac.compare_digest(key.key_hash, digest) or key.revoked_at is not None:
        return None
    return key


def _unauthorized(message: str) -> None:
    spend_unauthenticated()  # 429 instead once this address has sent too many
    abort(401, message=message, headers={"WWW-Authenticate": 'Bearer realm="stabletrain"'})


def require_key() -> None:
    """before_request: every /v1 route except the OpenAPI document needs a valid key."""
    if not request.path.startswith("/v1/") or request.path in PUBLIC_V1_PATHS:
        return
    header = request.headers.get("Authorization", "")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        _unauthorized("Missing API key: send 'Authorization: Bearer <key>'.")
    key = find_key(secret.strip())
    if key is None:
        _unauthorized("Invalid or revoked API key.")
    g.api_key = key


def current_owner_id() -> str:
    """Id of the authenticated key."""
    return g.api_key.id


def init_app(app: Flask) -> None:
    """Register the auth hook before any view runs."""
    app.before_request(require_key)
