"""Object stores: the local folder and a real S3-compatible server (SeaweedFS on loopback)."""

from __future__ import annotations

import hashlib
import os
import uuid

import httpx
import pytest
from evosparse.jobs.store import COMPLETE_MARKER, LocalStore, S3Store, open_store

from tests.service.servers import S3_ACCESS_KEY, S3_SECRET_KEY


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    weed = request.getfixturevalue("weed")
    bucket = f"st-{uuid.uuid4().hex[:8]}"
    weed.create_bucket(bucket)
    return open_store(f"s3://{bucket}/pre", weed.endpoint, access_key_id=S3_ACCESS_KEY,
                      secret_access_key=S3_SECRET_KEY)


@pytest.fixture
def checkpoint(tmp_path):
    d = tmp_path / "ckpt"
    (d / "sub").mkdir(parents=True)
    (d / "config.json").write_text('{"a": 1}')
    (d / "model.safetensors").write_bytes(os.urandom(300_000))
    (d / "sub" / "extra.txt").write_text("x")
    return d


def test_put_dir_publishes_everything_with_marker_last(store, checkpoint, tmp_path):
    objects = store.put_dir(checkpoint, "jobs/j1/attempt-1")
    assert sorted(o.name for o in objects) == ["config.json", "model.safetensors", "sub/extra.txt"]
    assert store.is_complete("jobs/j1/attempt-1")
    weights = (checkpoint / "model.safetensors").read_bytes()
    obj = next(o for o in objects if o.name == "model.safetensors")
    assert obj.size == len(weights) and obj.sha256 == hashlib.sha256(weights).hexdigest()
    assert store.get("jobs/j1/attempt-1/model.safetensors") == weights
    assert b"".join(store.iter_chunks("jobs/j1/attempt-1/config.json")) == b'{"a": 1}'
    assert store.key_of(obj.uri) == obj.key
    assert [o.name for o in store.manifest("jobs/j1/attempt-1")] == [o.name for o in objects]
    out = store.download_dir("jobs/j1/attempt-1", tmp_path / "copy")
    assert (out / "sub" / "extra.txt").read_text() == "x"
    assert not store.exists("jobs/j1/attempt-1/nothing")
    # Staging keys are gone once published.
    if isinstance(store, S3Store):
        keys = [o["Key"] for o in store.client.list_objects_v2(Bucket=store.bucket).get("Contents", [])]
        assert not [k for k in keys if "/tmp/" in k]
    else:
        assert not any((store.root / "tmp").iterdir())


def test_crash_mid_publish_leaves_nothing_that_looks_finished(store, checkpoint, monkeypatch):
    calls = {"n": 0}
    if isinstance(store, S3Store):
        real_copy = store.client.copy

        def flaky_copy(*a, **kw):  # noqa: ANN002, ANN003, ANN202
            calls["n"] += 1
            if calls["n"] == 2:
                raise ConnectionError("store went away mid-publish")
            return real_copy(*a, **kw)

        monkeypatch.setattr(store.client, "copy", flaky_copy)
    else:
        import shutil

        real_copyfile = shutil.copyfile

        def flaky_copyfile(src, dst, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError("disk full mid-publish")
            return real_copyfile(src, dst, *a, **kw)

        monkeypatch.setattr("evosparse.jobs.store.shutil.copyfile", flaky_copyfile)
    with pytest.raises((ConnectionError, OSError)):
        store.put_dir(checkpoint, "jobs/j2/attempt-1")
    assert not store.is_complete("jobs/j2/attempt-1")
    with pytest.raises(FileNotFoundError):
        store.download_dir("jobs/j2/attempt-1", "/tmp/never")
    monkeypatch.undo()
    store.put_dir(checkpoint, "jobs/j2/attempt-1")  # a retry publishes cleanly
    assert store.is_complete("jobs/j2/attempt-1")


def test_keys_cannot_escape_the_store(store):
    for bad in ("../x", "/etc/passwd", "a/../../b", "a//b", ""):
        with pytest.raises(ValueError):
            store.put_bytes(b"x", bad)


def test_s3_presigned_url_downloads_and_tampering_is_refused(weed, checkpoint):
    bucket = f"ps-{uuid.uuid4().hex[:8]}"
    weed.create_bucket(bucket)
    store = open_store(f"s3://{bucket}", weed.endpoint, access_key_id=S3_ACCESS_KEY,
                       secret_access_key=S3_SECRET_KEY)
    store.put_dir(checkpoint, "jobs/p/attempt-1")
    url = store.presigned_url("jobs/p/attempt-1/model.safetensors", expires_s=60)
    r = httpx.get(url)
    assert r.status_code == 200 and r.content == (checkpoint / "model.safetensors").read_bytes()
    # Unsigned or re-targeted requests are refused: the credentials really are checked.
    assert httpx.get(url.split("?")[0]).status_code in (401, 403)
    forged = url.replace("model.safetensors", "config.json")
    assert httpx.get(forged).status_code == 403
    assert httpx.get(f"{weed.endpoint}/{bucket}/jobs/p/attempt-1/{COMPLETE_MARKER}").status_code in (401, 403)


def test_open_store_rejects_unknown_schemes(tmp_path):
    with pytest.raises(ValueError):
        open_store("ftp://x/y")
    with pytest.raises(ValueError):
        open_store("s3://")
    assert isinstance(open_store(f"file://{tmp_path}/s"), LocalStore)


def test_orphans_of_dead_attempts_are_collected(store, checkpoint):
    """Attempt 1 published and died before recording; attempt 2 succeeded: only attempt 2 stays."""
    from evosparse.jobs.store import collect_orphans

    store.put_dir(checkpoint, "jobs/j9/attempt-1")
    store.put_dir(checkpoint, "jobs/j9/attempt-2")
    assert collect_orphans(store, "j9", 2, keep="jobs/j9/attempt-2") == ["jobs/j9/attempt-1"]
    assert not store.exists("jobs/j9/attempt-1/config.json")
    assert store.is_complete("jobs/j9/attempt-2") and store.exists("jobs/j9/attempt-2/model.safetensors")
    assert collect_orphans(store, "j9", 2, keep="jobs/j9/attempt-2") == []  # idempotent
    assert collect_orphans(store, "j9", 2, keep=None) == ["jobs/j9/attempt-2"]  # a failed job keeps none
