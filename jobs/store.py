"""Object store for artifacts: a local folder (default) or any S3-compatible store (boto3).

Publishing is atomic from a reader's point of view: ``put_dir`` first writes every file under a
temporary key (``tmp/<uuid>/...``), then moves/copies them to the final prefix, and writes the
``_COMPLETE`` marker (a JSON manifest of names, sizes and SHA-256) last. Readers trust only a
prefix whose marker exists (``is_complete``), so a crash mid-upload never leaves a half
checkpoint that looks finished; the job database records artifacts only after publication.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

COMPLETE_MARKER = "_COMPLETE"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class StoredObject:
    name: str  # path relative to the published prefix (e.g. "model.safetensors")
    key: str  # full key inside the store
    uri: str  # file:///... or s3://bucket/key
    size: int
    sha256: str


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_key(key: str) -> str:
    """Keys are relative, '/'-separated and never climb out of the store."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid store key {key!r}")
    return key


def _files_of(local_dir: Path) -> list[tuple[str, Path]]:
    files = sorted(p for p in Path(local_dir).rglob("*") if p.is_file())
    return [(p.relative_to(local_dir).as_posix(), p) for p in files]


class Store(ABC):
    """Minimal object-store interface used by the worker (publish) and the API (serve)."""

    url: str

    @abstractmethod
    def put_bytes(self, data: bytes, key: str) -> StoredObject: ...

    @abstractmethod
    def _publish(self, files: list[tuple[str, Path]], prefix: str) -> list[StoredObject]: ...

    def put_dir(self, local_dir: str | Path, prefix: str) -> list[StoredObject]:
        """Publish every file under ``local_dir`` at ``prefix/<relative path>``, marker last."""
        prefix = _check_key(prefix.strip("/"))
        files = _files_of(Path(local_dir))
        if not files:
            raise ValueError(f"nothing to publish: {local_dir} holds no files")
        objects = self._publish(files, prefix)
        manifest = {"files": [asdict(o) for o in objects]}
        self.put_bytes(json.dumps(manifest, indent=1).encode(), f"{prefix}/{COMPLETE_MARKER}")
        return objects

    @abstractmethod
    def get(self, key: str) -> bytes: ...

    @abstractmethod
    def iter_chunks(self, key: str) -> Iterator[bytes]: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None: ...

    @abstractmethod
    def presigned_url(self, key: str, expires_s: int = 3600) -> str | None:
        """A time-limited download URL, or None where the store cannot make one (local folder)."""

    @abstractmethod
    def uri(self, key: str) -> str: ...

    def key_of(self, uri: str) -> str:
        """Inverse of ``uri``."""
        base = self.uri("x")[:-1]
        if not uri.startswith(base):
            raise ValueError(f"{uri} does not belong to store {self.url}")
        return _check_key(uri[len(base):])

    def is_complete(self, prefix: str) -> bool:
        return self.exists(f"{prefix.strip('/')}/{COMPLETE_MARKER}")

    def manifest(self, prefix: str) -> list[StoredObject]:
        data = json.loads(self.get(f"{prefix.strip('/')}/{COMPLETE_MARKER}"))
        return [StoredObject(**o) for o in data["files"]]

    def download_dir(self, prefix: str, dest: str | Path) -> Path:
        """Copy a published prefix to a local folder (refuses unpublished prefixes)."""
        if not self.is_complete(prefix):
            raise FileNotFoundError(f"{prefix} is not a published artifact set in {self.url}")
        dest = Path(dest)
        for obj in self.manifest(prefix):
            target = dest / obj.name
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as f:
                for chunk in self.iter_chunks(obj.key):
                    f.write(chunk)
        return dest


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories; the data is fsynced anyway
        pass
    finally:
        os.close(fd)


def collect_orphans(store: Store, job_id: str, attempts: int, keep: str | None) -> list[str]:
    """Delete the artifact prefixes of a job's attempts except ``keep``: what a worker published and
    then died before recording (the next attempt publishes under its own prefix). Idempotent."""
    removed = []
    for attempt in range(1, max(0, attempts) + 1):
        prefix = f"jobs/{job_id}/attempt-{attempt}"
        if prefix != keep and _has_any(store, prefix):
            store.delete_prefix(prefix)
            removed.append(prefix)
    return removed


def _has_any(store: Store, prefix: str) -> bool:
    if isinstance(store, LocalStore):
        return store.local_path(prefix).exists()
    return bool(store.client.list_objects_v2(Bucket=store.bucket, Prefix=store._k(prefix) + "/",
                                             MaxKeys=1).get("KeyCount"))


class LocalStore(Store):
    """A folder on disk; publication is a directory rename (atomic on one filesystem)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def _tmp(self) -> Path:
        tmp = self.root / "tmp" / uuid.uuid4().hex
        tmp.mkdir(parents=True)
        return tmp

    def put_bytes(self, data: bytes, key: str) -> StoredObject:
        target = self._path(key)
        tmp = self._tmp() / "f"
        tmp.write_bytes(data)
        return self._commit_file(tmp, target, key)

    def _commit_file(self, tmp: Path, target: Path, key: str) -> StoredObject:
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        size, digest = tmp.stat().st_size, _sha256_file(tmp)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        shutil.rmtree(tmp.parent, ignore_errors=True)
        return StoredObject(key.rsplit("/", 1)[-1], key, self.uri(key), size, digest)

    def _publish(self, files: list[tuple[str, Path]], prefix: str) -> list[StoredObject]:
        staging = self._tmp()
        objects = []
        for name, src in files:
            dst = staging / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            with open(dst, "rb") as f:  # on disk before the rename publishes it (a crash keeps no torn file)
                os.fsync(f.fileno())
            key = f"{prefix}/{name}"
            objects.append(StoredObject(name, key, self.uri(key), dst.stat().st_size, _sha256_file(dst)))
        for folder in {staging, *(staging / name for name, _ in files)}:
            _fsync_dir(folder if folder.is_dir() else folder.parent)
        final = self._path(prefix)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():  # a retried publish replaces the previous, unmarked or stale, copy
            trash = self._tmp()
            os.replace(final, trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(staging, final)
        _fsync_dir(final.parent)  # the rename itself is durable
        return objects

    def get(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def iter_chunks(self, key: str) -> Iterator[bytes]:
        with open(self._path(key), "rb") as f:
            yield from iter(lambda: f.read(_CHUNK), b"")

    def local_path(self, key: str) -> Path:
        return self._path(key)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self._path(prefix.strip("/")), ignore_errors=True)

    def presigned_url(self, key: str, expires_s: int = 3600) -> str | None:
        return None

    def uri(self, key: str) -> str:
        return f"{self.url}/{key}"


class S3Store(Store):
    """An S3 bucket (AWS, MinIO, SeaweedFS...) with an optional key prefix."""

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None,
                 region: str = "us-east-1", access_key_id: str | None = None,
                 secret_access_key: str | None = None):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.client = boto3.client(
            "s3", endpoint_url=endpoint_url, region_name=region,
            aws_access_key_id=access_key_id, aws_secret_access_key=secret_access_key,
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"},
                          retries={"max_attempts": 5, "mode": "standard"}),
        )

    def _k(self, key: str) -> str:
        key = _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put_bytes(self, data: bytes, key: str) -> StoredObject:
        self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data)
        return StoredObject(key.rsplit("/", 1)[-1], key, self.uri(key), len(data), hashlib.sha256(data).hexdigest())

    def _publish(self, files: list[tuple[str, Path]], prefix: str) -> list[StoredObject]:
        staging = f"tmp/{uuid.uuid4().hex}"
        objects = []
        try:
            for name, src in files:
                self.client.upload_file(str(src), self.bucket, self._k(f"{staging}/{name}"))
            for name, src in files:
                key = f"{prefix}/{name}"
                # Managed copy: server-side, multipart for objects above 5 GB.
                self.client.copy({"Bucket": self.bucket, "Key": self._k(f"{staging}/{name}")},
                                 self.bucket, self._k(key))
                objects.append(StoredObject(name, key, self.uri(key), src.stat().st_size, _sha256_file(src)))
        finally:
            self.delete_prefix(staging)
        return objects

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=self._k(key))["Body"].read()

    def iter_chunks(self, key: str) -> Iterator[bytes]:
        body = self.client.get_object(Bucket=self.bucket, Key=self._k(key))["Body"]
        try:
            yield from body.iter_chunks(_CHUNK)
        finally:
            body.close()

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._k(key))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def delete_prefix(self, prefix: str) -> None:
        full = self._k(prefix.strip("/")) + "/"
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            for i in range(0, len(keys), 1000):
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys[i:i + 1000]})

    def presigned_url(self, key: str, expires_s: int = 3600) -> str | None:
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._k(key)}, ExpiresIn=expires_s)

    def uri(self, key: str) -> str:
        return f"{self.url}/{key}"


def open_store(url: str, endpoint_url: str | None = None, region: str = "us-east-1",
               access_key_id: str | None = None, secret_access_key: str | None = None) -> Store:
    """``file:///folder`` -> LocalStore, ``s3://bucket[/prefix]`` -> S3Store."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return LocalStore(parsed.path)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"store URL {url!r} needs a bucket: s3://bucket[/prefix]")
        return S3Store(parsed.netloc, parsed.path, endpoint_url, region, access_key_id, secret_access_key)
    raise ValueError(f"store URL must start with file:// or s3://, got {url!r}")


def store_from_settings(settings=None) -> Store:  # noqa: ANN001
    from evosparse.jobs.settings import get_settings

    s = settings or get_settings()
    return open_store(s.resolved_store_url, s.s3_endpoint_url, s.s3_region, s.s3_access_key_id,
                      s.s3_secret_access_key)
