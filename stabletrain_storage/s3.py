"""S3-compatible bucket storage (AWS, MinIO, ...) through boto3.

An object appears whole or not at all (S3 creates it when its single PUT or its multipart upload
completes), so writers upload first and record after. Large files go up in parts through boto3's
managed transfer (`upload_file` with a TransferConfig). Workers read through a local cache folder.
"""

from __future__ import annotations

import functools
import io
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from stabletrain_storage.base import ObjectInfo, Storage, StorageError, check_key

MB = 1 << 20
# parts of 16 MB from 16 MB on: a checkpoint of a few hundred MB goes up as parallel parts
TRANSFER = TransferConfig(multipart_threshold=16 * MB, multipart_chunksize=16 * MB, max_concurrency=4)
MISSING = {"404", "NoSuchKey", "NotFound"}
CHANGED = {"412", "PreconditionFailed"}
FORBIDDEN = {"403", "AccessDenied", "Forbidden"}


def _missing(exc: ClientError) -> bool:
    return str(exc.response.get("Error", {}).get("Code")) in MISSING


def _wrap(what: str, exc: Exception) -> StorageError:
    return StorageError(f"storage: {what} failed: {exc}")


@contextmanager
def _object_errors(action: str, key: str) -> Iterator[None]:
    """Boto's errors on one object as the Storage interface raises them: a missing object is
    FileNotFoundError, any other failure StorageError."""
    try:
        yield
    except ClientError as exc:
        if _missing(exc):
            raise FileNotFoundError(f"{key} is not stored") from exc
        raise _wrap(f"{action} of {key}", exc) from exc
    except BotoCoreError as exc:
        raise _wrap(f"{action} of {key}", exc) from exc


class S3Storage(Storage):
    """Objects in `bucket` under `prefix`; local copies in `cache_dir`."""

    is_remote = True

    def __init__(self, bucket: str, prefix: str, cache_dir: Path, endpoint_url: str | None = None,
                 client: Any = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.cache_dir = Path(cache_dir)
        # credentials and region come from boto3's usual sources (AWS_ACCESS_KEY_ID, ... or a profile)
        self.client = client or boto3.client(
            "s3", endpoint_url=endpoint_url or None,
            config=Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=5, read_timeout=60))
        self._injected = client
        self._endpoint_url = endpoint_url or None

    def __repr__(self) -> str:
        return f"S3Storage(s3://{self.bucket}/{self.prefix})"

    @functools.cached_property
    def probe_client(self) -> Any:
        """A client for readiness probes, built on first use (workers never probe): one attempt and
        1 s / 2 s timeouts, so a probe answers within ~3 s instead of after five attempts of 60 s."""
        return self._injected or boto3.client(
            "s3", endpoint_url=self._endpoint_url,
            config=Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=1, read_timeout=2))

    def check(self) -> str | None:
        try:
            self.probe_client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in FORBIDDEN:
                return None  # it answered: keys limited to a prefix may not HEAD the bucket itself
            return f"bucket {self.bucket}: {exc}"
        except BotoCoreError as exc:
            return f"bucket {self.bucket}: {exc}"
        return None

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _unkey(self, full: str) -> str:
        return full[len(self.prefix) + 1:] if self.prefix else full

    def put_file(self, local_path: Path, key: str) -> None:
        try:
            self.client.upload_file(str(local_path), self.bucket, self._key(key), Config=TRANSFER)
        except (BotoCoreError, ClientError, S3UploadFailedError) as exc:
            raise _wrap(f"upload of {key}", exc) from exc

    def put_bytes(self, data: bytes, key: str) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except (BotoCoreError, ClientError) as exc:
            raise _wrap(f"write of {key}", exc) from exc

    def read_bytes(self, key: str) -> bytes:
        with _object_errors("read", key):
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

    def _head(self, key: str) -> dict[str, Any] | None:
        try:
            with _object_errors("stat", key):
                return self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except FileNotFoundError:
            return None

    def stat(self, key: str) -> ObjectInfo | None:
        head = self._head(key)
        if head is None:
            return None
        return ObjectInfo(size=int(head["ContentLength"]), modified=head["LastModified"].timestamp())

    def open(self, key: str) -> tuple[BinaryIO, ObjectInfo]:
        head = self._head(key)
        if head is None:
            raise FileNotFoundError(f"{key} is not stored")
        info = ObjectInfo(size=int(head["ContentLength"]), modified=head["LastModified"].timestamp())
        reader = _RangeReader(self.client, self.bucket, self._key(key), info.size, head["ETag"])
        return io.BufferedReader(reader, buffer_size=1 * MB), info

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except (BotoCoreError, ClientError) as exc:
            raise _wrap(f"delete of {key}", exc) from exc

    def list(self, prefix: str) -> list[str]:
        if prefix:
            check_key(prefix.rstrip("/"))
        full = (f"{self.prefix}/" if self.prefix else "") + prefix
        keys: list[str] = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                keys.extend(self._unkey(item["Key"]) for item in page.get("Contents", []))
        except (BotoCoreError, ClientError) as exc:
            raise _wrap(f"listing of {prefix}", exc) from exc
        return sorted(keys)

    def move(self, key: str, new_key: str) -> bool:
        # S3 has no rename: a server-side copy (managed, multipart for large objects), then the delete
        try:
            with _object_errors("move", key):
                self.client.copy({"Bucket": self.bucket, "Key": self._key(key)}, self.bucket,
                                 self._key(new_key), Config=TRANSFER)
        except FileNotFoundError:
            return False
        self.delete(key)
        return True

    def local_dir(self, prefix: str) -> Path:
        folder = self.cache_dir / check_key(prefix.rstrip("/"))
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def local_copy(self, key: str, refresh: bool = False) -> Path:
        path = self.cache_dir / check_key(key)
        if path.is_file() and not refresh:
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
        try:
            with _object_errors("download", key):
                self.client.download_file(self.bucket, self._key(key), str(tmp), Config=TRANSFER)
            os.replace(tmp, path)  # readers of the cache never see a partial download
        finally:
            tmp.unlink(missing_ok=True)
        return path


class _RangeReader(io.RawIOBase):
    """A seekable reader of one object version: each read after a seek opens a ranged GET from there.

    Written here because boto3 has no seekable object reader; werkzeug's Range handling seeks it, so a
    download of the last megabyte fetches that megabyte only. `IfMatch` pins the version opened: an object
    rewritten meanwhile fails the read instead of mixing two contents."""

    def __init__(self, client: Any, bucket: str, key: str, size: int, etag: str) -> None:
        super().__init__()
        self._client, self._bucket, self._key, self._size, self._etag = client, bucket, key, size, etag
        self._pos = 0
        self._body: Any = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        position = max(0, base + offset)
        if position != self._pos:
            self._drop_body()
            self._pos = position
        return self._pos

    def readinto(self, buffer: Any) -> int:
        if self._pos >= self._size:
            return 0
        if self._body is None:
            try:
                self._body = self._client.get_object(Bucket=self._bucket, Key=self._key, IfMatch=self._etag,
                                                     Range=f"bytes={self._pos}-")["Body"]
            except ClientError as exc:
                if _missing(exc) or str(exc.response.get("Error", {}).get("Code")) in CHANGED:
                    raise FileNotFoundError(f"{self._key} was deleted or rewritten while read") from exc
                raise _wrap(f"read of {self._key}", exc) from exc
        data = self._body.read(len(buffer))
        if not data:
            raise StorageError(f"storage: {self._key} ended at byte {self._pos} of {self._size}")
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def _drop_body(self) -> None:
        if self._body is not None:
            self._body.close()
            self._body = None

    def close(self) -> None:
        self._drop_body()
        super().close()
