"""Folder storage (the embedded default): keys are paths under one root folder."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import BinaryIO

from stabletrain_storage.base import ObjectInfo, Storage, check_key


class LocalStorage(Storage):
    """Files under `root`; a write goes to a temp file beside its target and is renamed into place."""

    is_remote = False

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    def check(self) -> str | None:
        # a folder not made yet is fine (the first write makes it) when its nearest existing parent is writable
        folder = self.root.absolute()
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir():
            return f"the storage folder {self.root} cannot be made: {folder} is not a folder"
        if not os.access(folder, os.W_OK | os.X_OK):
            return f"the storage folder {self.root} is not writable ({folder})"
        return None

    def path(self, key: str) -> Path:
        """The file of a key."""
        return self.root / check_key(key)

    def put_file(self, local_path: Path, key: str) -> None:
        target = self.path(key)
        if target.exists() and os.path.samefile(local_path, target):
            return  # written in place (a checkpoint in its own folder): nothing to move
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.{uuid.uuid4().hex}.part"
        try:
            try:
                os.link(local_path, tmp)  # same file system: no copy, and the source stays
            except OSError:
                shutil.copyfile(local_path, tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    def put_bytes(self, data: bytes, key: str) -> None:
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.replace(name, target)
        finally:
            Path(name).unlink(missing_ok=True)

    def read_bytes(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def stat(self, key: str) -> ObjectInfo | None:
        try:
            st = os.stat(self.path(key))
        except FileNotFoundError:
            return None
        return ObjectInfo(size=st.st_size, modified=st.st_mtime)

    def open(self, key: str) -> tuple[BinaryIO, ObjectInfo]:
        fh = open(self.path(key), "rb")  # noqa: SIM115 - the caller streams and closes it
        st = os.fstat(fh.fileno())
        return fh, ObjectInfo(size=st.st_size, modified=st.st_mtime)

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def list(self, prefix: str) -> list[str]:
        folder_key = prefix.rpartition("/")[0]
        folder = self.root / check_key(folder_key) if folder_key else self.root
        if not folder.is_dir():
            return []
        keys = (p.relative_to(self.root).as_posix() for p in folder.rglob("*")
                if p.is_file() and not p.name.startswith("."))  # dot files: writes in progress
        return sorted(k for k in keys if k.startswith(prefix))

    def move(self, key: str, new_key: str) -> bool:
        target = self.path(new_key)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(self.path(key), target)
        except FileNotFoundError:
            return False
        return True

    def local_dir(self, prefix: str) -> Path:
        folder = self.root / check_key(prefix.rstrip("/"))
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def local_copy(self, key: str, refresh: bool = False) -> Path:
        path = self.path(key)
        if not path.is_file():
            raise FileNotFoundError(f"{key} is not stored")
        return path
