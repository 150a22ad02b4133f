"""Pick the backend from the configuration."""

from __future__ import annotations

import threading
from pathlib import Path
from urllib.parse import urlsplit

from stabletrain_storage.base import Storage
from stabletrain_storage.local import LocalStorage

_OPENED: dict[tuple[str, str, str, str], Storage] = {}
_LOCK = threading.Lock()


def open_storage(url: str | None, storage_dir: Path, endpoint_url: str | None = None,
                 cache_dir: Path | None = None) -> Storage:
    """The store for STORAGE_URL: `s3://bucket/prefix` (boto3; `endpoint_url` for MinIO and other
    non-AWS stores), or the folder `storage_dir` when the URL is empty. A bucket's local copies go to
    `cache_dir` (default `<storage_dir>/cache`). One instance per configuration and process: a boto3
    client is costly to build and safe to share between threads."""
    url = (url or "").strip()
    if not url:
        return LocalStorage(Path(storage_dir))
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"STORAGE_URL must be s3://bucket[/prefix] or empty, not {url!r}")
    cache = Path(cache_dir) if cache_dir else Path(storage_dir) / "cache"
    ident = (url, str(storage_dir), endpoint_url or "", str(cache))
    with _LOCK:
        if ident not in _OPENED:
            from stabletrain_storage.s3 import S3Storage  # boto3 only where a bucket is configured

            _OPENED[ident] = S3Storage(parts.netloc, parts.path, cache, endpoint_url=endpoint_url)
        return _OPENED[ident]
