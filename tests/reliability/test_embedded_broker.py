"""Workers started together on a fresh embedded broker: the loser of kombu's queue-creation race retries.

kombu's SQLAlchemy transport creates its tables and queue rows with a check-then-insert
guarded by an in-process lock only; a second worker process starting at the same moment
used to die with `IntegrityError: UNIQUE constraint failed: kombu_queue.name` (seen in
the two-worker fault tests). The race is simulated here: the first insert fails as the
loser's would, the declare retries and finds the rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kombu.transport.sqlalchemy import Channel
from sqlalchemy import create_engine, text
from sqlalchemy.exc import IntegrityError

from app import create_app
from worker.celery_app import declare_embedded_queues, make_celery
from worker.settings import load_settings


def test_queue_declare_retries_after_losing_the_creation_race(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    broker = tmp_path / "broker.db"
    flask_app = create_app({"DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}",
                            "BROKER_URL": f"sqlalchemy+sqlite:///{broker}", "STORAGE_DIR": str(tmp_path / "s")})
    celery = make_celery(flask_app, load_settings(flask_app.config, env={}))
    real = Channel._get_or_create
    calls: list[str] = []

    def racing(self: Channel, queue: str) -> Any:
        calls.append(queue)
        if len(calls) == 1:  # another process inserted the row between our check and our insert
            raise IntegrityError("INSERT INTO kombu_queue", {}, Exception("UNIQUE constraint failed"))
        return real(self, queue)

    monkeypatch.setattr(Channel, "_get_or_create", racing)
    declare_embedded_queues(celery)
    assert len(calls) > 2
    engine = create_engine(f"sqlite:///{broker}")
    with engine.connect() as conn:
        names = set(conn.execute(text("SELECT name FROM kombu_queue")).scalars())
    engine.dispose()
    assert {"train", "samples"} <= names
