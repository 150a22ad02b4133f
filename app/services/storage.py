"""The API's store (a folder or a bucket, see stabletrain_storage) and its keys, built only from
server-made values.

The key builders refuse anything else (a ValueError, so a 500 rather than a key outside the layout): a
dataset is named by the sha256 the server computed, a checkpoint by a job id the server made and an
int step. Request values never get here unchecked (see services.common.get_owned).
"""

from __future__ import annotations

import re
from pathlib import Path

from flask import Response, current_app, request
from werkzeug.wsgi import wrap_file

from app.models import is_server_id
from stabletrain_export.rules import FORMATS, export_relpath
from stabletrain_storage import Storage, open_storage
from stabletrain_storage import checkpoint_key as layout_checkpoint_key
from stabletrain_storage import dataset_key as layout_dataset_key

SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def storage_dir() -> Path:
    """Root of the local storage folder (with a bucket: this host's temp files and caches)."""
    return Path(current_app.config["STORAGE_DIR"])


def storage() -> Storage:
    """The configured store: STORAGE_URL's bucket, else the STORAGE_DIR folder."""
    config = current_app.config
    return open_storage(config.get("STORAGE_URL"), storage_dir(), config.get("S3_ENDPOINT_URL") or None,
                        Path(config["CACHE_DIR"]) if config.get("CACHE_DIR") else None)


def dataset_key(sha256: str) -> str:
    """Content-addressed dataset object."""
    if not (isinstance(sha256, str) and SHA256_HEX.fullmatch(sha256)):
        raise ValueError(f"not a sha256 hex digest: {sha256!r:.80}")
    return layout_dataset_key(sha256)


def token_keys(sha256: str) -> list[str]:
    """The workers' tokenized copies of a dataset file (`tokens/<sha256>-<tokenizer>.u16` and sidecars)."""
    dataset_key(sha256)  # the same check on the digest
    return storage().list(f"tokens/{sha256}-")


def checkpoint_key(job_id: str, step: int) -> str:
    """Checkpoint object of a job at a step."""
    if not is_server_id(job_id, "job") or isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"not a server-made job id and step: {job_id!r:.80}, {step!r:.20}")
    return layout_checkpoint_key(job_id, step)


def export_key(job_id: str, step: int, sha256: str, fmt: str) -> str:
    """A checkpoint's export (named by the record's sha256; fmt one of the known formats)."""
    if not (isinstance(sha256, str) and SHA256_HEX.fullmatch(sha256)) or fmt not in FORMATS:
        raise ValueError(f"not a sha256 hex digest and export format: {sha256!r:.80}, {fmt!r:.20}")
    checkpoint_key(job_id, step)  # the same checks on the job id and step
    return export_relpath(job_id, step, sha256, fmt)


def tmp_dir() -> Path:
    """Local scratch folder for uploads on their way into the store (the store's own folder when local,
    so putting a file there is a rename)."""
    return storage().scratch_dir()


def send_stored(key: str, *, mimetype: str, download_name: str, etag: str) -> Response:
    """Stream a stored object through the API with ETag, Last-Modified and Range (206/304/412 by
    werkzeug's conditional handling, as send_file does for a path); FileNotFoundError when absent.

    Both backends stream: a client authenticates to the API, never to the bucket, and a bucket
    object is read with ranged GETs from where the Range asks."""
    fileobj, info = storage().open(key)
    response = current_app.response_class(wrap_file(request.environ, fileobj), mimetype=mimetype,
                                          direct_passthrough=True)
    response.headers.set("Content-Disposition", "attachment", filename=download_name)
    response.content_length = info.size
    response.last_modified = info.modified  # type: ignore[assignment]
    response.cache_control.no_cache = True
    response.set_etag(etag)
    return response.make_conditional(request, accept_ranges=True, complete_length=info.size)
