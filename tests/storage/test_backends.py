"""Both backends behave alike: put/read/stat/list/move/delete, atomic local copies, verified fetches.

The S3 backend runs against moto's HTTP server (tests/storage/conftest.py), through real boto3 calls."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

from stabletrain_storage import LocalStorage, Storage, fetch_verified, open_storage
from stabletrain_storage.s3 import S3Storage


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "folder")
    bucket = request.getfixturevalue("bucket")
    return S3Storage(bucket, "pre/fix", tmp_path / "cache", endpoint_url=request.getfixturevalue("moto_endpoint"))


def test_put_read_stat_list_move_delete(store: Storage, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 1000)
    store.put_file(src, "datasets/a.txt")
    store.put_bytes(b"hello", "exports/job_1/step_5-abc.safetensors.error")
    assert src.read_bytes() == b"x" * 1000  # the source stays
    assert store.read_bytes("datasets/a.txt") == b"x" * 1000
    assert store.stat("datasets/a.txt").size == 1000 and store.stat("datasets/b.txt") is None
    assert store.list("exports/") == ["exports/job_1/step_5-abc.safetensors.error"]
    assert store.list("datasets/a") == ["datasets/a.txt"] and store.list("data/") == []
    assert store.move("datasets/a.txt", "tmp/a.deleting") and not store.exists("datasets/a.txt")
    assert not store.move("datasets/a.txt", "tmp/again")
    assert store.read_bytes("tmp/a.deleting") == b"x" * 1000
    store.delete("tmp/a.deleting")
    store.delete("tmp/a.deleting")  # absent: no error
    store.delete_prefix("exports/")
    assert store.list("") == []
    with pytest.raises(FileNotFoundError):
        store.read_bytes("datasets/a.txt")
    with pytest.raises(FileNotFoundError):
        store.open("datasets/a.txt")


@pytest.mark.parametrize("key", ["../x", "/etc/passwd", "a//b", "a/./b", "", "a\\b", "a/\x00"])
def test_keys_outside_the_layout_are_refused(store: Storage, key: str) -> None:
    with pytest.raises(ValueError):
        store.put_bytes(b"x", key)


def test_open_seeks_and_reads_ranges(store: Storage) -> None:
    payload = bytes(range(256)) * 64
    store.put_bytes(payload, "checkpoints/job_1/step_1.pt")
    reader, info = store.open("checkpoints/job_1/step_1.pt")
    with reader:
        assert info.size == len(payload)
        reader.seek(1000)
        assert reader.read(24) == payload[1000:1024]
        reader.seek(-10, os.SEEK_END)
        assert reader.read() == payload[-10:]
        reader.seek(0)
        assert reader.read() == payload


def test_fetch_verified_refetches_a_stale_copy_and_refuses_a_damaged_object(store: Storage, tmp_path: Path) -> None:
    key, v1, v2 = "checkpoints/job_1/step_5.pt", b"checkpoint v1", b"checkpoint v2"
    sha1, sha2 = hashlib.sha256(v1).hexdigest(), hashlib.sha256(v2).hexdigest()
    store.put_bytes(v1, key)
    path = fetch_verified(store, key, sha1)
    assert path is not None and path.read_bytes() == v1
    store.put_bytes(v2, key)  # the key is rewritten (a resumed run writes the step again)
    # a cached copy of the old content is not trusted for the new record: fetched again
    assert fetch_verified(store, key, sha2).read_bytes() == v2
    if isinstance(store, S3Storage):  # another host, empty cache: the object does not match the old record
        store = S3Storage(store.bucket, store.prefix, tmp_path / "host2", client=store.client)
    assert fetch_verified(store, key, sha1) is None
    assert fetch_verified(store, "checkpoints/job_1/step_6.pt", sha1) is None


def test_large_files_go_up_in_parts(bucket: str, moto_endpoint: str, s3_client: Any, tmp_path: Path) -> None:
    store = S3Storage(bucket, "", tmp_path / "cache", endpoint_url=moto_endpoint)
    big = tmp_path / "big.pt"
    big.write_bytes(os.urandom(1 << 20) * 17)  # 17 MB: over the 16 MB multipart threshold
    store.put_file(big, "checkpoints/job_1/step_1.pt")
    head = s3_client.head_object(Bucket=bucket, Key="checkpoints/job_1/step_1.pt")
    assert head["ETag"].strip('"').endswith("-2")  # a multipart upload's ETag counts its parts
    copy = store.local_copy("checkpoints/job_1/step_1.pt")
    assert copy.read_bytes() == big.read_bytes() and copy.parent == tmp_path / "cache" / "checkpoints" / "job_1"


def test_open_storage_picks_the_backend(tmp_path: Path, moto_endpoint: str) -> None:
    assert isinstance(open_storage("", tmp_path), LocalStorage)
    s3 = open_storage("s3://bucket-x/a/b", tmp_path, moto_endpoint)
    assert isinstance(s3, S3Storage) and (s3.bucket, s3.prefix, s3.cache_dir) == ("bucket-x", "a/b", tmp_path / "cache")
    assert open_storage("s3://bucket-x/a/b", tmp_path, moto_endpoint) is s3  # one client per configuration
    with pytest.raises(ValueError):
        open_storage("gs://bucket", tmp_path)


def test_tokenizers_and_token_files_travel_through_the_bucket(bucket: str, moto_endpoint: str, tmp_path: Path) -> None:
    """Host A's trained tokenizer and token file reach the bucket; host B's cache folders get them before training."""
    from worker.artifacts import pull_dataset_caches, push_dataset_caches

    sha, other = hashlib.sha256(b"some corpus").hexdigest(), hashlib.sha256(b"another corpus").hexdigest()
    host_a = S3Storage(bucket, "p", tmp_path / "a", endpoint_url=moto_endpoint)
    host_b = S3Storage(bucket, "p", tmp_path / "b", client=host_a.client)
    name, tokens = f"bpe-{sha}-300-r1.json", f"{sha}-bpe-0123abcd.u16"
    (host_a.local_dir("tokenizers") / name).write_text('{"model": 1}')
    (host_a.local_dir("tokenizers") / f"bpe-{other}-300-r1.json").write_text("{}")
    (host_a.local_dir("tokens") / tokens).write_bytes(b"\x01\x00\x02\x00")
    (host_a.local_dir("tokens") / f".{tokens}.abc.tmp").write_bytes(b"half")  # a write in progress
    push_dataset_caches(host_a, sha)
    assert host_a.list("tokenizers/") == [f"tokenizers/{name}"]  # only this dataset's
    assert host_a.list("tokens/") == [f"tokens/{tokens}"]
    pull_dataset_caches(host_b, sha)
    assert [p.name for p in (tmp_path / "b" / "tokenizers").iterdir()] == [name]
    assert (tmp_path / "b" / "tokenizers" / name).read_text() == '{"model": 1}'
    assert (tmp_path / "b" / "tokens" / tokens).read_bytes() == b"\x01\x00\x02\x00"


def test_check_says_when_the_store_can_be_used(tmp_path: Path, bucket: str, moto_endpoint: str) -> None:
    assert LocalStorage(tmp_path / "not" / "made" / "yet").check() is None  # the first write makes it
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert "is not a folder" in LocalStorage(blocker / "storage").check()
    assert S3Storage(bucket, "p", tmp_path / "cache", endpoint_url=moto_endpoint).check() is None
    missing = S3Storage(f"{bucket}-gone", "p", tmp_path / "cache", endpoint_url=moto_endpoint).check()
    assert missing is not None and missing.startswith(f"bucket {bucket}-gone: ")
    closed = f"http://127.0.0.1:{_closed_port()}"
    down = S3Storage(bucket, "p", tmp_path / "cache", endpoint_url=closed).check()
    assert down is not None and "Could not connect" in down


def _closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_bucket_that_forbids_head_still_counts_as_answering(tmp_path: Path) -> None:
    """Keys limited to a prefix may not HEAD the bucket: a 403 is an answer, not an outage."""
    from botocore.exceptions import ClientError

    class PrefixOnlyKeys:  # what S3 answers such keys; moto's server does not enforce IAM
        def __init__(self, code: str) -> None:
            self.code = code

        def head_bucket(self, Bucket: str) -> None:  # noqa: N803 - boto3's parameter name
            raise ClientError({"Error": {"Code": self.code, "Message": "no"}}, "HeadBucket")

    assert S3Storage("b", "p", tmp_path, client=PrefixOnlyKeys("403")).check() is None
    assert S3Storage("b", "p", tmp_path, client=PrefixOnlyKeys("404")).check().startswith("bucket b: ")
