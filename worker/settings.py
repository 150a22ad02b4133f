"""Worker configuration: the API's STABLETRAIN_* variables plus worker-only knobs.

Worker-only environment variables (all optional):

- STABLETRAIN_JOB_TIME_LIMIT_S    longest one training attempt may run (default 86400 = 24 h)
- STABLETRAIN_LEASE_S             how long a claim lasts without a heartbeat (default 30)
- STABLETRAIN_HEARTBEAT_S         how often the lease is renewed and cancel is polled (default 2)
- STABLETRAIN_RECONCILE_EVERY_S   how often each worker runs the reconciler; 0 turns it off (default 5)
- STABLETRAIN_RESEND_AFTER_S      re-send a queued job whose last enqueue is older than this (default 600)
- STABLETRAIN_RELAY_EVERY_S       how often each worker sends unsent queued work (the outbox); 0 turns it off (default 1)
- STABLETRAIN_IDLE_RESEND_S       an idle worker re-sends queued jobs sent longer ago than this, once idle this long (default 10)
- STABLETRAIN_SAMPLE_TIMEOUT_S    a running sample older than this is marked failed (default 600)
- STABLETRAIN_PROBE_TIMEOUT_S     a running LR probe older than this is marked failed (default 3600)
- STABLETRAIN_DB_RETRY_S          how long the reporter retries a failing database write (default 300)
- STABLETRAIN_STORAGE_RETRY_S     how long a starting job waits for an unreachable bucket before it fails (default 300)
- STABLETRAIN_MAX_ATTEMPTS        worker deaths (expired leases) after which a job fails instead of requeueing (default 5);
                                  graceful hand-backs (warm shutdown) do not count
- STABLETRAIN_DEVICE              torch device override (cpu, cuda, cuda:1, ...)
- STABLETRAIN_WORKER_ID           name written to jobs.worker_id (default <host>:<pid>)
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.config import default_config
from stabletrain_storage import Storage, open_storage

PREFIX = "STABLETRAIN_"

WORKER_DEFAULTS: dict[str, float] = {
    "JOB_TIME_LIMIT_S": 24 * 3600,
    "LEASE_S": 30,
    "HEARTBEAT_S": 2,
    "RECONCILE_EVERY_S": 5,
    "RESEND_AFTER_S": 600,
    "RELAY_EVERY_S": 1,
    "IDLE_RESEND_S": 10,
    "SAMPLE_TIMEOUT_S": 600,
    "PROBE_TIMEOUT_S": 3600,
    "DB_RETRY_S": 300,
    "STORAGE_RETRY_S": 300,
    "MAX_ATTEMPTS": 5,
}

# Redis redelivers an unacked message after visibility_timeout; keep it above the
# longest job so a healthy long job is never handed to a second worker.
VISIBILITY_MARGIN_S = 3600


@dataclass(frozen=True)
class WorkerSettings:
    """Everything a worker process needs to know, read once from the environment."""

    database_url: str
    broker_url: str
    storage_dir: Path
    job_time_limit_s: float
    lease_s: float
    heartbeat_s: float
    reconcile_every_s: float
    resend_after_s: float
    relay_every_s: float
    idle_resend_s: float
    sample_timeout_s: float
    probe_timeout_s: float
    db_retry_s: float
    max_attempts: int
    device: str | None
    worker_id: str
    storage_url: str = ""
    s3_endpoint_url: str = ""
    cache_dir: Path | None = None
    storage_retry_s: float = 300.0

    @property
    def storage(self) -> Storage:
        """The shared store (STORAGE_URL's bucket, else the STORAGE_DIR folder) with this host's cache."""
        return open_storage(self.storage_url, self.storage_dir, self.s3_endpoint_url or None, self.cache_dir)

    @property
    def visibility_timeout_s(self) -> int:
        """Broker redelivery timeout: above the longest allowed job."""
        return int(self.job_time_limit_s + VISIBILITY_MARGIN_S)


def load_settings(config: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> WorkerSettings:
    """Worker settings from the Flask config (which already holds STABLETRAIN_*), else the environment."""
    env = os.environ if env is None else env
    config = config or {}
    base = default_config()

    def value(key: str) -> Any:
        if config.get(key) not in (None, ""):
            return config[key]
        if env.get(PREFIX + key) not in (None, ""):
            return env[PREFIX + key]
        return base.get(key, WORKER_DEFAULTS.get(key))

    return WorkerSettings(
        database_url=str(value("DATABASE_URL")),
        broker_url=str(value("BROKER_URL")),
        storage_dir=Path(str(value("STORAGE_DIR"))),
        job_time_limit_s=float(value("JOB_TIME_LIMIT_S")),
        lease_s=float(value("LEASE_S")),
        heartbeat_s=float(value("HEARTBEAT_S")),
        reconcile_every_s=float(value("RECONCILE_EVERY_S")),
        resend_after_s=float(value("RESEND_AFTER_S")),
        relay_every_s=float(value("RELAY_EVERY_S")),
        idle_resend_s=float(value("IDLE_RESEND_S")),
        sample_timeout_s=float(value("SAMPLE_TIMEOUT_S")),
        probe_timeout_s=float(value("PROBE_TIMEOUT_S")),
        db_retry_s=float(value("DB_RETRY_S")),
        storage_retry_s=float(value("STORAGE_RETRY_S")),
        max_attempts=int(value("MAX_ATTEMPTS")),
        device=str(value("DEVICE")) if value("DEVICE") else None,
        worker_id=str(value("WORKER_ID") or f"{socket.gethostname()}:{os.getpid()}"),
        storage_url=str(value("STORAGE_URL") or ""),
        s3_endpoint_url=str(value("S3_ENDPOINT_URL") or ""),
        cache_dir=Path(str(value("CACHE_DIR"))) if value("CACHE_DIR") else None,
    )


def pick_device(override: str | None) -> str:
    """The torch device to train on: the override, else cuda:0 when present, else cpu."""
    if override:
        return override
    import torch  # imported here so the API-side import of settings stays torch-free

    # one worker per GPU: the deployment pins the GPU with CUDA_VISIBLE_DEVICES
    return "cuda:0" if torch.cuda.is_available() else "cpu"
