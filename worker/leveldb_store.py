"""Level databases as stored artifacts, reused by later jobs and loaded by every scoring worker.

A level database's expensive part (the score rankings, or SparseGPT's layer Hessians) depends on
the model's weights, the pruner and the calibration windows, and on nothing else: not on the
target sparsity or the level grid (a job's grid only selects the rank band it keeps in memory).
So the key is sha256 of (format version, model content fingerprint, pruner, calibration-token
fingerprint, device type) and a job on the same model content reuses what an earlier job built,
whatever its sparsity. A database calibrated on pruned inputs (``search.level_inputs``) also
depends on the allocation that prune ran at: its digest is part of the key. Stored under
``leveldb/<key>/`` in the object store (local folder or S3), published with the store's
completion marker, so a half-written database is never read.

SparseGPT's anchor levels (built up front for a job's level grid) are stored beside it as
``leveldb/<key>-anchors-<grid digest>/``: a later job with the same grid and every scoring worker
of the job read them instead of running the OBS passes again.

Each machine keeps local copies under its scratch folder (the work dir); past ``scratch_bytes``
the least recently used copies are deleted (the store keeps the original).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from evosparse.jobs.store import Store
from evosparse.pruning.leveldb import FORMAT_VERSION, LevelDB, anchor_grid_digest, stored_anchors_match
from evosparse.pruning.snapshot import model_fingerprint, tokens_fingerprint
from evosparse.worker.search_stage import LevelSource
from torch import nn

log = logging.getLogger("evosparse.leveldb")


def leveldb_key(model_hash: str, pruner: str, calib_hash: str, device_type: str, inputs: str = "dense") -> str:
    parts = {"format": FORMAT_VERSION, "model": model_hash, "pruner": pruner, "calib": calib_hash,
             "device": device_type}
    if inputs != "dense":  # (absent for dense inputs: the keys stored before pruned inputs existed stay valid)
        parts["inputs"] = inputs
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:40]


class LevelStore(LevelSource):
    """Loads level databases from ``store`` when present; builds, then publishes them otherwise."""

    def __init__(self, store: Store, scratch: str | Path, scratch_bytes: int | None = None,
                 scratch_min_age_s: float = 600.0) -> None:
        self.store = store
        self.scratch = Path(scratch)
        self.scratch_bytes = scratch_bytes
        self.scratch_min_age_s = scratch_min_age_s  # a copy used more recently may be loading elsewhere
        self.last_key: str | None = None  # the key of the database the last load/build served
        self.built = 0
        self.loaded = 0
        self.anchors_read = 0  # SparseGPT anchor sets read from the store / built here and stored
        self.anchors_stored = 0
        self._keys: dict[tuple[int, int, str], str] = {}
        # Set by the job task when the job has scoring workers: SparseGPT anchors are then built by
        # them too (worker/anchor_build.py's AnchorFanout), called as (store, key, db, anchors, progress).
        self.anchor_fanout: Any = None

    def key_for(self, model: nn.Module, calib: torch.Tensor, pruner: str, dense: Any = None,
                inputs: str = "dense") -> str:
        """The database key of this model content, pruner, calibration data and calibration inputs
        (hashed once per job)."""
        memo = (id(model), id(calib), pruner, inputs)
        if memo not in self._keys:
            device = next(model.parameters()).device.type
            self._keys[memo] = leveldb_key(model_fingerprint(model, dense), pruner, tokens_fingerprint(calib), device,
                                           inputs)
        return self._keys[memo]

    @staticmethod
    def prefix(key: str) -> str:
        return f"leveldb/{key}"

    def _local(self, key: str) -> Path | None:
        """A local copy of the stored database, downloaded once per machine."""
        folder = self.scratch / key
        if (folder / "meta.json").is_file():
            self._touch(folder)
            return folder
        if not self.store.is_complete(self.prefix(key)):
            return None
        tmp = self.scratch / f".{key}.{uuid.uuid4().hex[:8]}"
        try:
            self.store.download_dir(self.prefix(key), tmp)
            try:
                tmp.rename(folder)
            except OSError:  # another process on this machine got there first
                shutil.rmtree(tmp, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._touch(folder)
        self.trim(keep=folder)
        return folder

    @staticmethod
    def _touch(folder: Path) -> None:
        now = time.time()
        os.utime(folder, (now, now))

    def trim(self, keep: Path | None = None) -> list[str]:
        """Delete the least recently used local copies until the rest fit in ``scratch_bytes``.

        A copy used in the last ``scratch_min_age_s`` stays (another process may be loading it).
        """
        if self.scratch_bytes is None or not self.scratch.is_dir():
            return []
        copies = [f for f in self.scratch.iterdir() if f.is_dir() and not f.name.startswith(".")]
        sizes = {f: sum(x.stat().st_size for x in f.rglob("*") if x.is_file()) for f in copies}
        total = sum(sizes.values())
        removed = []
        for folder in sorted(copies, key=lambda f: f.stat().st_mtime):
            if total <= self.scratch_bytes:
                break
            if folder == keep or time.time() - folder.stat().st_mtime < self.scratch_min_age_s:
                continue
            shutil.rmtree(folder, ignore_errors=True)  # a job loading it right now holds its tensors already
            total -= sizes[folder]
            removed.append(folder.name)
        if removed:
            log.info("level database scratch: removed %d least recently used copies", len(removed))
        return removed

    def load_key(self, key: str, model: nn.Module, pruner: str, **kwargs: Any) -> LevelDB | None:
        folder = self._local(key)
        if folder is None:
            return None
        self.last_key = key
        self.loaded += 1
        kwargs, fanned = self._fanned_anchors(self._with_stored_anchors(key, kwargs))
        db = LevelDB.load(folder, model, pruner, **kwargs)
        if fanned is not None:
            self.anchor_fanout(self, key, db, *fanned)
        self._store_anchors(key, db)
        return db

    def _fanned_anchors(self, kwargs: dict[str, Any]) -> tuple[dict[str, Any], tuple[Any, Any] | None]:
        """With scorers to share the work, anchors not stored are left out of the database's own build
        and handed to ``anchor_fanout`` (with the progress callback) once the Hessians are stored."""
        if self.anchor_fanout is None or not kwargs.get("anchors") or "anchor_folder" in kwargs:
            return kwargs, None
        rest = {k: v for k, v in kwargs.items() if k not in ("anchors", "progress")}
        return rest, (kwargs["anchors"], kwargs.get("progress"))

    # SparseGPT anchor levels depend on the level grid too, so they are a separate artifact per
    # (database key, grid): ``leveldb/<key>-anchors-<grid digest>/``, published like the database.
    @staticmethod
    def anchor_key(key: str, anchors: Any) -> str:
        return f"{key}-anchors-{anchor_grid_digest(anchors)}"

    def _with_stored_anchors(self, key: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        anchors = kwargs.get("anchors")
        if not anchors:
            return kwargs
        folder = self._local(self.anchor_key(key, anchors))
        if folder is None or not stored_anchors_match(folder, anchors):
            return kwargs
        self.anchors_read += 1
        return {**kwargs, "anchor_folder": folder}

    def _store_anchors(self, key: str, db: LevelDB) -> None:
        """Publish the anchors this process just built (a later job, every scorer, reads them)."""
        if not db.anchors or db.anchors_loaded:
            return
        if self._put_anchors(key, db):
            self.anchors_stored += 1
            log.info("SparseGPT anchor levels of %s stored (%d levels)", key, db.anchor_levels())

    def _put_anchors(self, key: str, db: LevelDB) -> bool:
        """Store the anchors ``db`` holds under their grid's name, unless the store has them already."""
        akey = self.anchor_key(key, {n: list(a) for n, a in db.anchors.items()})
        if self.store.is_complete(self.prefix(akey)):
            return False
        tmp = self.scratch / f".{akey}.{uuid.uuid4().hex[:8]}"
        try:
            db.save_anchors(tmp)
            self._publish(tmp, akey)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return True

    # Anchor parts: one block's anchors, built by a scorer while the coordinator builds others
    # (worker/anchor_build.py), stored by the same rule as a whole set, under that block's grid.
    def stored_anchor_part(self, key: str, grid: dict[str, list[int]]) -> Path | None:
        """A local copy of the stored anchors of exactly ``grid`` (one block's), or None."""
        folder = self._local(self.anchor_key(key, grid))
        return folder if folder is not None and stored_anchors_match(folder, grid) else None

    def store_anchor_part(self, key: str, part: LevelDB) -> None:
        """Publish the anchors ``part`` holds (a database of one block) as their own stored set."""
        self._put_anchors(key, part)

    def drop_anchor_parts(self, key: str, grids: list[dict[str, list[int]]]) -> None:
        """Delete the parts once the whole set is assembled (store and this machine's copies)."""
        for grid in grids:
            akey = self.anchor_key(key, grid)
            self.store.delete_prefix(self.prefix(akey))
            shutil.rmtree(self.scratch / akey, ignore_errors=True)

    def local_copy(self, key: str) -> Path | None:
        """This machine's copy of the stored database ``key`` (downloaded on first use), or None."""
        return self._local(key)

    def _publish(self, tmp: Path, key: str) -> Path:
        """Put the folder written at ``tmp`` in the store under ``key`` (unless another process already
        has) and keep it as this machine's local copy, the least recently used copies trimmed."""
        if not self.store.is_complete(self.prefix(key)):
            self.store.put_dir(tmp, self.prefix(key))
        folder = self.scratch / key
        if not folder.exists():
            tmp.rename(folder)
        self._touch(folder)
        self.trim(keep=folder)
        return folder

    def load(self, model: nn.Module, calib: torch.Tensor, pruner: str, inputs: str = "dense",
             **kwargs: Any) -> LevelDB | None:
        key = self.key_for(model, calib, pruner, kwargs.get("dense"), inputs)
        return self.load_key(key, model, pruner, **kwargs)

    def build(self, model: nn.Module, calib: torch.Tensor, pruner: str, inputs: str = "dense",
              **kwargs: Any) -> LevelDB:
        key = self.key_for(model, calib, pruner, kwargs.get("dense"), inputs)
        kwargs, fanned = self._fanned_anchors(self._with_stored_anchors(key, kwargs))
        tmp = self.scratch / f".{key}.{uuid.uuid4().hex[:8]}"
        try:
            db = LevelDB.build(model, calib, pruner, save_to=tmp, **kwargs)
            self._publish(tmp, key)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.last_key = key
        self.built += 1
        log.info("level database %s built and stored", key)
        if fanned is not None:  # the Hessians the scorers read are stored now
            self.anchor_fanout(self, key, db, *fanned)
        self._store_anchors(key, db)
        return db
