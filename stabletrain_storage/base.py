"""The storage interface both backends implement, and helpers on top of it."""

from __future__ import annotations

import hashlib
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

log = logging.getLogger(__name__)


class StorageError(OSError):
    """The store could not be reached or refused an operation (bucket missing, credentials, network)."""


@dataclass(frozen=True)
class ObjectInfo:
    """What a reader needs to know about a stored object."""

    size: int
    modified: float  # unix seconds (the store's clock)


def check_key(key: str) -> str:
    """A key is a relative POSIX path without `..`, empty or dot segments (ValueError otherwise):
    callers build keys from server-made values only, this is the last guard before a path or a bucket."""
    parts = key.split("/") if isinstance(key, str) else []
    if not parts or key.startswith("/") or "\\" in key or "\x00" in key or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"not a storage key: {key!r:.120}")
    return key


class Storage(ABC):
    """Files by key. Writes are atomic for readers: an object appears whole or not at all.

    Workers read through `local_copy`: the file itself in a folder store, a copy in the worker's
    cache folder (downloaded once) for a bucket.
    """

    #: True when objects live elsewhere (a bucket): local files must be uploaded and copies fetched
    is_remote: bool = False

    @abstractmethod
    def check(self) -> str | None:
        """None when the store can be used now; else what is wrong, in words (for /readyz). Quick: a
        readiness probe calls it every few seconds."""

    @abstractmethod
    def put_file(self, local_path: Path, key: str) -> None:
        """Store a local file under `key` (the local file stays; large files go up in parts)."""

    @abstractmethod
    def put_bytes(self, data: bytes, key: str) -> None:
        """Store a small object."""

    @abstractmethod
    def read_bytes(self, key: str) -> bytes:
        """A small object's content; FileNotFoundError when absent."""

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo | None:
        """Size and modification time, None when absent."""

    def exists(self, key: str) -> bool:
        """Whether the object is stored."""
        return self.stat(key) is not None

    @abstractmethod
    def open(self, key: str) -> tuple[BinaryIO, ObjectInfo]:
        """A seekable binary reader of the object and its info; FileNotFoundError when absent.

        A folder store's reader keeps serving its file after a delete; a bucket's reader serves the
        version it opened, or fails (FileNotFoundError) when that version is gone before its first read."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove an object; nothing happens when it is absent."""

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Keys starting with `prefix` (a folder ends in '/'), sorted."""

    def delete_prefix(self, prefix: str) -> None:
        """Remove every object under a folder prefix."""
        for key in self.list(prefix):
            self.delete(key)

    @abstractmethod
    def move(self, key: str, new_key: str) -> bool:
        """Rename an object; False when `key` is absent."""

    @abstractmethod
    def local_dir(self, prefix: str) -> Path:
        """The local folder that holds the files of `prefix` on this host (created): the store's own
        folder, or the cache folder of a bucket. Files written there reach the store through put_file."""

    @abstractmethod
    def local_copy(self, key: str, refresh: bool = False) -> Path:
        """A local file with the object's content (the stored file itself, or the cached copy, downloaded
        when missing or when `refresh`); FileNotFoundError when the store lacks it."""

    def scratch_dir(self) -> Path:
        """A local folder for temp files that will be put into the store."""
        return self.local_dir("tmp")


def file_sha256(path: Path) -> str:
    """sha256 hex of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_verified(store: Storage, key: str, sha256: str) -> Path | None:
    """A local copy of `key` whose content has this sha256, or None (absent or damaged in the store).

    A cached copy that does not match (a key rewritten since, or a torn download) is fetched again once."""
    for refresh in (False, True) if store.is_remote else (False,):
        try:
            path = store.local_copy(key, refresh=refresh)
        except FileNotFoundError:
            return None
        if file_sha256(path) == sha256:
            return path
    log.warning("stored object %s does not match its recorded sha256 %s", key, sha256[:16])
    if store.is_remote:
        path.unlink(missing_ok=True)  # a damaged copy in the cache must not be read by anyone later
    return None


def key_name(key: str) -> str:
    """Last segment of a key (its file name)."""
    return PurePosixPath(key).name
