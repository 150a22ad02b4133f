"""Dataset upload, listing and deletion."""

from __future__ import annotations

import codecs
import hashlib
import logging
import os
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from flask import current_app
from flask_smorest import abort
from sqlalchemy import func, select, update
from sqlalchemy.dialects import postgresql, sqlite

from app.extensions import db
from app.inputs import BAD_TEXT
from app.models import UNFINISHED_STATUSES, Dataset, DatasetFile, Job
from app.services.common import get_owned, lock_owner, newest_first_page
from app.services.storage import dataset_key, storage, tmp_dir, token_keys

CHUNK = 1 << 20
log = logging.getLogger(__name__)


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
    """Copy the upload to a temp file in CHUNK reads, hashing and UTF-8 checking as it streams.

    Memory stays at a chunk whatever the upload's size. The incremental decoder keeps the first bytes
    of a character cut by a chunk end for the next chunk, so a valid multi-byte character split across
    chunks passes. Past `max_bytes` (413) or at invalid UTF-8 (422) the temp file is removed before
    anything is recorded.
    """
    digest = hashlib.sha256()
    decoder = codecs.getincrementaldecoder("utf-8")()
    size = 0
    fd, name = tempfile.mkstemp(dir=tmp_dir(), prefix="upload-")
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in _chunks(stream):
                if size + len(chunk) > max_bytes:
                    abort(413, message=f"Dataset exceeds the {max_bytes} byte limit (STABLETRAIN_MAX_DATASET_BYTES).",
                          details={"max_bytes": max_bytes})
                _check_utf8(decoder, chunk, size)
                size += len(chunk)
                digest.update(chunk)
                out.write(chunk)
            _check_utf8(decoder, b"", size, final=True)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    if size == 0:
        path.unlink(missing_ok=True)
        abort(422, message="Dataset is empty.", details={"file": ["empty file"]})
    return StoredFile(path, size, digest.hexdigest())


def _check_utf8(decoder: codecs.IncrementalDecoder, chunk: bytes, offset: int, final: bool = False) -> None:
    """Feed a chunk (starting at byte `offset` of the upload) to the decoder; 422 naming the bad byte."""
    held = len(decoder.getstate()[0])  # bytes of a character the previous chunk cut
    try:
        decoder.decode(chunk, final=final)
    except UnicodeDecodeError as exc:
        at = offset - held + exc.start
        abort(422, message=f"Dataset is not valid UTF-8 text (byte {at}).",
              details={"file": [f"invalid UTF-8 at byte {at}: {exc.reason}"]})


def _check_quota(owner_id: str, size: int) -> None:
    quota = int(current_app.config["MAX_DATASET_BYTES_PER_KEY"])
    used = db.session.execute(select(func.coalesce(func.sum(Dataset.bytes), 0)).where(Dataset.owner_id == owner_id)).scalar_one()
    if used + size > quota:
        abort(413, message=f"Dataset quota exceeded: this key stores {used} of {quota} bytes; delete datasets first.",
              details={"used_bytes": int(used), "quota_bytes": quota, "upload_bytes": size})


def _count_file_ref(sha256: str, delta: int) -> int:
    """Add delta to the references of a stored file and return the new count.

    The UPDATE locks the hash's row until the caller commits (a row lock on PostgreSQL, the write lock on
    SQLite); every upload and delete of that content passes here first, so they take turns. Rows stay at
    refs 0 when unused, so the row to lock always exists once a content was stored."""
    insert = postgresql.insert if db.session.get_bind().dialect.name == "postgresql" else sqlite.insert
    db.session.execute(insert(DatasetFile).values(sha256=sha256, refs=0).on_conflict_do_nothing(index_elements=["sha256"]))
    db.session.execute(update(DatasetFile).where(DatasetFile.sha256 == sha256).values(refs=DatasetFile.refs + delta)
                       .execution_options(synchronize_session=False))
    return db.session.execute(select(DatasetFile.refs).where(DatasetFile.sha256 == sha256)).scalar_one()


def create_dataset(owner_id: str, stream: IO[bytes], name: str | None) -> Dataset:
    """Validate, store content-addressed, and record an upload (one more reference to its file)."""
    stored = _spool(stream, int(current_app.config["MAX_DATASET_BYTES"]))
    try:
        lock_owner(owner_id)  # after the upload, until the commit below: concurrent uploads queue here
        _check_quota(owner_id, stored.size)
        _count_file_ref(stored.sha256, +1)  # under the hash's lock until the commit: no delete removes it
        store, key = storage(), dataset_key(stored.sha256)
        if not store.exists(key):
            store.put_file(stored.tmp_path, key)  # upload first, record after: the commit below
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
    """Delete unless a live job uses it; remove the file when its last reference goes (under the hash's lock)."""
    dataset = get_dataset(owner_id, dataset_id)
    lock_owner(owner_id)  # a concurrent submit of this key either commits first (409 here) or sees it gone
    live = db.session.execute(
        select(Job.id).where(Job.dataset_id == dataset.id, Job.status.in_(UNFINISHED_STATUSES)).limit(1)
    ).scalar_one_or_none()
    if live is not None:
        abort(409, message=f"Dataset {dataset.id} is used by unfinished job {live}; cancel it or wait.",
              details={"job_id": live})
    sha = dataset.sha256
    refs = _count_file_ref(sha, -1)
    db.session.delete(dataset)
    db.session.flush()
    if _rows_sharing(sha, refs) > 0:
        db.session.commit()
        return
    # the last reference: the file goes with the commit, while no upload of this content can run
    store, key = storage(), dataset_key(sha)
    aside = _move_aside(key)
    try:
        db.session.commit()
    except BaseException:
        if aside is not None:
            store.move(aside, key)
        db.session.rollback()
        raise
    if aside is not None:
        store.delete(aside)
    for key in token_keys(sha):  # derived from the file: of no use without it (a worker's open map stays valid)
        store.delete(key)


def _rows_sharing(sha256: str, refs: int) -> int:
    """Dataset rows (any key's) still pointing at the file; the count is set to it when they disagree
    (rows written before the counts existed, or by hand), so a wrong count never removes a used file."""
    rows = db.session.execute(select(func.count()).select_from(Dataset).where(Dataset.sha256 == sha256)).scalar_one()
    if rows != refs:
        log.warning("dataset file %s: %s references counted, %s rows; using the rows", sha256, refs, rows)
        db.session.execute(update(DatasetFile).where(DatasetFile.sha256 == sha256).values(refs=rows))
    return rows


def _move_aside(key: str) -> str | None:
    """Move an object to tmp/ in the store (a rename in a folder), so a failed commit can put it back;
    None when absent."""
    aside = f"tmp/{key.rsplit('/', 1)[-1]}.{uuid.uuid4().hex}.deleting"
    return aside if storage().move(key, aside) else None


def distinct_characters(dataset: Dataset) -> int | None:
    """How many distinct characters the dataset's text has (a char tokenizer's vocabulary less its
    unknown id), read in chunks from the store; None when it cannot be read as UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    seen: set[str] = set()
    try:
        stream, _ = storage().open(dataset_key(dataset.sha256))
        with stream:
            while chunk := stream.read(1 << 20):
                seen.update(decoder.decode(chunk))
        seen.update(decoder.decode(b"", final=True))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return len(seen)
