"""`flask keys create|list|revoke`."""

from __future__ import annotations

import click
from flask import Flask
from flask.cli import AppGroup
from sqlalchemy import select

from app.auth import hash_secret, new_secret
from app.extensions import db
from app.models import ApiKey, utcnow

keys_cli = AppGroup("keys", help="Manage API keys.")


@keys_cli.command("create")
@click.argument("name")
def create_key(name: str) -> None:
    """Create a key and print its secret (shown only this once)."""
    secret = new_secret()
    key = ApiKey(name=name, key_hash=hash_secret(secret), prefix=secret[:10])
    db.session.add(key)
    db.session.commit()
    click.echo(f"id: {key.id}")
    click.echo(f"key: {secret}")


@keys_cli.command("list")
def list_keys() -> None:
    """List keys (id, prefix, name, created, revoked)."""
    for key in db.session.execute(select(ApiKey).order_by(ApiKey.created_at)).scalars():
        revoked = key.revoked_at.isoformat() if key.revoked_at else "-"
        click.echo(f"{key.id}\t{key.prefix}…\t{key.name}\t{key.created_at.isoformat()}\trevoked={revoked}")


@keys_cli.command("revoke")
@click.argument("key_id")
def revoke_key(key_id: str) -> None:
    """Revoke a key by id; its requests answer 401 from now on."""
    key = db.session.get(ApiKey, key_id)
    if key is None:
        raise click.ClickException(f"no key {key_id}")
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        db.session.commit()
    click.echo(f"revoked {key.id}")


def init_app(app: Flask) -> None:
    """Register the CLI groups."""
    app.cli.add_command(keys_cli)
