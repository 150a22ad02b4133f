"""Configuration defaults; every key can be overridden by a STABLETRAIN_<KEY> environment variable.

Environment variables (values are parsed as JSON when possible, else kept as strings):

- STABLETRAIN_DATABASE_URL              SQLAlchemy URL (default sqlite:///<repo>/var/stabletrain.db)
- STABLETRAIN_BROKER_URL                Celery broker (default sqlalchemy+sqlite:///<repo>/var/broker.db)
- STABLETRAIN_STORAGE_DIR               datasets and checkpoints (default <repo>/var/storage); with a bucket
                                        it holds only this host's temp files and caches
- STABLETRAIN_STORAGE_URL               s3://bucket/prefix keeps datasets, tokenizers, checkpoints and exports
                                        in an S3-compatible bucket (boto3; AWS_ACCESS_KEY_ID,
                                        AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION); empty = STORAGE_DIR
- STABLETRAIN_S3_ENDPOINT_URL           endpoint of a non-AWS store (MinIO: http://minio:9000)
- STABLETRAIN_CACHE_DIR                 a worker's local copies of bucket objects (default <STORAGE_DIR>/cache)
- STABLETRAIN_MAX_DATASET_BYTES         largest upload (default 1 GiB; streamed to disk, 413 past it)
- STABLETRAIN_MAX_JSON_BYTES             largest JSON request body (default 1 MB)
- STABLETRAIN_MAX_DATASET_BYTES_PER_KEY total dataset bytes per API key (default 4 GiB)
- STABLETRAIN_MAX_PARAMS                largest estimated model (default 50M parameters)
- STABLETRAIN_MAX_STEPS                 largest training.max_steps (default 1,000,000)
- STABLETRAIN_MAX_SEQ_LEN               largest training.seq_len (default 2048)
- STABLETRAIN_MAX_DEVICES               largest resources.devices: the devices one training worker has
                                        (default 1; set it to the GPUs per worker)
- STABLETRAIN_MAX_LIVE_JOBS             queued + running jobs per key (default 8)
- STABLETRAIN_MAX_QUEUED_SAMPLES        queued + running samples per key (default 8); past it 429
- STABLETRAIN_MAX_QUEUED_PROBES         queued + running LR probes per key (default 2); past it 429
- STABLETRAIN_SAMPLE_MAX_WAITING        sample requests per API process that may hold their thread for
                                        `?wait=` at once (default 1); past it they answer 202 at once
- STABLETRAIN_RATELIMIT_DEFAULT         Flask-Limiter default limit per key (default "600/minute")
- STABLETRAIN_RATELIMIT_UNAUTHENTICATED per-IP limit of requests without a valid key, 401s included
                                        (default "30/minute")
- STABLETRAIN_RATELIMIT_STORAGE_URI     limiter storage (default memory://; e.g. redis://host:6379/1)
- STABLETRAIN_RATELIMIT_ENABLED         turn rate limiting off with 0/false
- STABLETRAIN_ENQUEUE_RETRIES           broker publish retries before giving up (default 1)
- STABLETRAIN_BROKER_TIMEOUT_S          broker connect timeout for publishing and /readyz (default 1.0)
- STABLETRAIN_MAX_WEBHOOKS_PER_KEY       webhook endpoints per API key (default 10)
- STABLETRAIN_WEBHOOK_ALLOW_HTTP        1 = accept http:// webhook URLs (default: https only)
- STABLETRAIN_WEBHOOK_ALLOW_PRIVATE     1 = accept webhook hosts on loopback/private/link-local addresses
- STABLETRAIN_WEBHOOK_RETRY_SCHEDULE    delays between attempts in seconds, JSON list or comma-separated
                                        (default 5,300,1800,7200,18000,36000,36000; each +-20% jitter)
- STABLETRAIN_WEBHOOK_CONNECT_TIMEOUT_S connect timeout of a delivery (default 3)
- STABLETRAIN_WEBHOOK_TIMEOUT_S         read timeout of a delivery (default 10)
- STABLETRAIN_WEBHOOK_RESEND_AFTER_S    the relay re-sends a due delivery no message claimed for this long (default 60)
- STABLETRAIN_WEBHOOK_CA_BUNDLE         PEM file of CAs for receivers' certificates (default: certifi's bundle)
- STABLETRAIN_WEBHOOK_RETENTION_DAYS    events older than this, with no delivery still pending, are deleted with
                                        their delivery logs (default 30)
- STABLETRAIN_LOG_JSON                  1 = one JSON object per log line
- STABLETRAIN_LOG_LEVEL                 default INFO
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
VAR_DIR = REPO_ROOT / "var"

MB = 1_000_000
GIB = 1 << 30


def default_config() -> dict[str, Any]:
    """Defaults that run on one machine with no servers."""
    return {
        "DATABASE_URL": f"sqlite:///{VAR_DIR / 'stabletrain.db'}",
        "BROKER_URL": f"sqlalchemy+sqlite:///{VAR_DIR / 'broker.db'}",
        "STORAGE_DIR": str(VAR_DIR / "storage"),
        "STORAGE_URL": "",
        "S3_ENDPOINT_URL": "",
        "CACHE_DIR": "",
        "MAX_DATASET_BYTES": GIB,
        "MAX_DATASET_BYTES_PER_KEY": 4 * GIB,
        "MAX_JSON_BYTES": 1 * MB,
        "MAX_PARAMS": 50_000_000,
        "MAX_STEPS": 1_000_000,
        "MAX_SEQ_LEN": 2048,
        "MAX_DEVICES": 1,
        "MAX_LIVE_JOBS": 8,
        "MAX_QUEUED_SAMPLES": 8,
        "MAX_QUEUED_PROBES": 2,
        "SAMPLE_MAX_WAITING": 1,
        "ENQUEUE_RETRIES": 1,
        "BROKER_TIMEOUT_S": 1.0,
        "SAMPLE_POLL_S": 0.2,
        "MAX_WEBHOOKS_PER_KEY": 10,
        "WEBHOOK_ALLOW_HTTP": False,
        "WEBHOOK_ALLOW_PRIVATE": False,
        "WEBHOOK_RETRY_SCHEDULE": "",
        "WEBHOOK_CONNECT_TIMEOUT_S": 3.0,
        "WEBHOOK_TIMEOUT_S": 10.0,
        "WEBHOOK_RESEND_AFTER_S": 60.0,
        "WEBHOOK_CA_BUNDLE": "",
        "WEBHOOK_RETENTION_DAYS": 30.0,
        "LOG_JSON": False,
        "LOG_LEVEL": "INFO",
        "RATELIMIT_DEFAULT": "600/minute",
        "RATELIMIT_UNAUTHENTICATED": "30/minute",
        "RATELIMIT_STORAGE_URI": "memory://",
        "RATELIMIT_ENABLED": True,
        "RATELIMIT_HEADERS_ENABLED": True,
        "RATELIMIT_HEADER_RETRY_AFTER_VALUE": "delta-seconds",
        # Flask-Limiter writes its window's reset into this header on every response; under the standard
        # name it overwrote our own Retry-After (a 202 export "ask again in 1 s", a 503 "in 5 s") with up
        # to a minute. A limiter 429 still gets Retry-After (app.errors.retry_after_s).
        "RATELIMIT_HEADER_RETRY_AFTER": "X-RateLimit-Retry-After",
        "SQLALCHEMY_TRACK_MODIFICATIONS": False,
        "API_TITLE": "StableTrain",
        "API_VERSION": "v1",
        "OPENAPI_VERSION": "3.0.3",
        "OPENAPI_URL_PREFIX": "/v1",
        "OPENAPI_JSON_PATH": "openapi.json",
        "API_SPEC_OPTIONS": {
            "components": {
                "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            },
            "security": [{"bearer": []}],
        },
    }


def finalize_config(config: dict[str, Any]) -> None:
    """Derive framework keys (SQLAlchemy URI, upload size cap) from our own keys."""
    config["SQLALCHEMY_DATABASE_URI"] = config["DATABASE_URL"]
    # multipart framing needs a little room above the largest file
    config.setdefault("MAX_CONTENT_LENGTH", int(config["MAX_DATASET_BYTES"]) + 64 * 1024)
    options = dict(config.get("SQLALCHEMY_ENGINE_OPTIONS") or {})
    # A pooled connection that a database restart closed is replaced before use, not answered with a 500.
    options.setdefault("pool_pre_ping", True)
    if str(config["DATABASE_URL"]).startswith("sqlite"):
        options.setdefault("connect_args", {"timeout": 30})
    config["SQLALCHEMY_ENGINE_OPTIONS"] = options


def ensure_dirs(config: dict[str, Any]) -> None:
    """Create the storage folder and the folders of SQLite files."""
    storage = Path(config["STORAGE_DIR"])
    for sub in ("datasets", "checkpoints", "tmp"):
        (storage / sub).mkdir(parents=True, exist_ok=True)
    for key in ("DATABASE_URL", "BROKER_URL"):
        path = sqlite_path(str(config[key]))
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)


def sqlite_path(url: str) -> Path | None:
    """File path of a sqlite:/// URL (also sqlalchemy+sqlite://), else None."""
    for prefix in ("sqlite:///", "sqlalchemy+sqlite:///"):
        if url.startswith(prefix):
            rest = url[len(prefix):].split("?", 1)[0]
            if rest and rest != ":memory:":
                return Path(rest)
    return None
