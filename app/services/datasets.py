"""Dataset upload, listing and deletion."""

from __future__ import annotations

import codecs
import hashlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from flask import current_app
from flask_smorest import abort
from sqlalchemy import func, select

from app.extensions import db
from app.inputs import BAD_TEXT
from app.models import LIVE_STATUSES, Dataset, Job
from app.services.common import get_owned, lock_owner, newest_first_page
from app.services.storage import dataset_path, tmp_dir

CHUNK = 1 << 20


@dataclass
class StoredFile:
    """A validated upload sitting in a temp file."""

    tmp_path: Path
    size: int
    sha256: str


def _chunks(stream: IO[bytes]) -> Iterator[bytes]:
    while chunk := stream.read(CHUNK):
        yield chunk


def _spool(stream: IO[bytes], max_bytes: int) -> StoredFile:
    """Copy the upload to a temp file, hashing and UTF-8 checking as it streams."""
    digest = hashlib.sha256()
    decoder = codecs.getincrementaldecoder("utf-8")()
    size = 0
    fd, name = tempfile.mkstemp(dir=tmp_dir(), prefix="upload-")
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in _chunks(stream):
                size += len(chunk)
                if size > max_bytes:
                    abort(413, message=f"Dataset exceeds the {max_bytes} byte limit.")
                digest.update(chunk)
                decoder.decode(chunk)
                out.write(chunk)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError as exc:
        path.unlink(missing_ok=True)
        abort(422, message="Dataset is not valid UTF-8 text.", details={"file": [f"invalid UTF-8 at byte {exc.start}"]})
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    if size == 0:
        path.unlink(missing_ok=True)
        abort(422, message="Dataset is empty.", details={"file": ["empty file"]})
    return StoredFile(path, size, digest.hexdigest())


def _check_quota(owner_id: str, size: int) -> None:
    quota = int(current_app.config["MAX_DATASET_BYTES_PER_KEY"])
    used = db.session.execute(select(func.coalesce(func.sum(Dataset.bytes), 0)).where(Dataset.owner_id == owner_id)).scalar_one()
    if used + size > quota:
        abort(413, message=f"Dataset quota exceeded: this key stores {used} of {quota} bytes; delete datasets first.",
              details={"used_bytes": int(used), "quota_bytes": quota, "upload_bytes": size})


def create_dataset(owner_id: str, stream: IO[bytes], name: str | None) -> Dataset:
    """Validate, store content-addressed, and record an upload."""
    stored = _spool(stream, int(current_app.config["MAX_DATASET_BYTES"]))
    try:
        lock_owner(owner_id)  # after the upload, until the commit below: concurrent uploads queue here
        _check_quota(owner_id, stored.size)
        target = dataset_path(stored.sha256)
        if target.exists():
            stored.tmp_path.unlink(missing_ok=True)
        else:
            os.replace(stored.tmp_path, target)
    finally:
        stored.tmp_path.unlink(missing_ok=True)
    # a multipart filename is the client's own metadata: drop what no database can store rather than refuse
    clean = BAD_TEXT.sub("", name or "")[:200] or "dataset"
    dataset = Dataset(owner_id=owner_id, name=clean, bytes=stored.size, sha256=stored.sha256)
    db.session.add(dataset)
    db.session.commit()
    return dataset


def list_datasets(owner_id: str, limit: int, cursor: str | None) -> tuple[list[Dataset], str | None]:
    """One page of the key's datasets, newest first."""
    return newest_first_page(select(Dataset).where(Dataset.owner_id == owner_id), Dataset, limit, cursor)


def get_dataset(owner_id: str, dataset_id: str) -> Dataset:
    """The key's dataset or 404."""
    return get_owned(Dataset, dataset_id, owner_id, "Dataset")


def delete_dataset(owner_id: str, dataset_id: str) -> None:
    """Delete unless a live job uses it; remove the file when no other row shares it."""
    dataset = get_dataset(owner_id, dataset_id)
    lock_owner(owner_id)  # a concurrent submit of this key either commits first (409 here) or sees it gone
    live = db.session.execute(
        select(Job.id).where(Job.dataset_id == dataset.id, Job.status.in_(LIVE_STATUSES)).limit(1)
    ).scalar_one_or_none()
    if live is not None:
        abort(409, message=f"Dataset {dataset.id} is used by live job {live}; cancel it or wait.",
              details={"job_id": live})
    sha = dataset.sha256
    db.session.delete(dataset)
    db.session.commit()
    shared = db.session.execute(select(Dataset.id).where(Dataset.sha256 == sha).limit(1)).scalar_one_or_none()
    if shared is None:
        dataset_path(sha).unlink(missing_ok=True)
