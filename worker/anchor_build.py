"""SparseGPT anchor levels built in parallel by a job's scoring workers, one block per work item.

The anchor levels (pruning/leveldb.py: every linear at a coarse grid of counts, one OBS pass per
linear) are the expensive part of a SparseGPT level database: ~100–200 s on SmolLM2-135M on a
2-core CPU, most of a short job. They depend only on the dense weights, the layer Hessians and
the grid, and a block's levels do not depend on any other block's, so once the coordinator has
stored the Hessians (the level database proper) the blocks can be built anywhere:

- the coordinator writes one work item per block to Redis as a batch (worker/scoring.py's
  batches: taken one at a time, under a lease, put back if the taker dies) and sends
  ``workers - 1`` wake-ups to the scoring queue, then builds blocks itself until none is left;
- a scorer loads the model and the stored Hessians of its blocks, builds their anchors and
  publishes each block's as its own stored anchor set (``LevelStore.store_anchor_part``: the
  usual ``leveldb/<key>-anchors-<digest of that block's grid>/``, so a part survives a
  coordinator restart and is found by the same rule), then answers with the part's key;
- the coordinator reads the parts others built into its database, and the whole set is then
  stored as one (what the scorers of the search and later jobs read); the parts are deleted.

The levels are the same bits wherever they are built (one device type, one torch thread count),
so the search that follows is the one a single process would run.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from evosparse.worker.scoring import _keys, drain_batch, post_batch, serve_batch

log = logging.getLogger("evosparse.anchors")


def block_grid(info: Any, anchors: dict[str, list[int]]) -> dict[str, list[int]]:
    """One block's share of a job's anchor grid: the counts of its linears that have any."""
    return {n: list(anchors[n]) for n in info.linears if n in anchors}


def block_grids(db: Any, anchors: dict[str, list[int]]) -> list[tuple[int, dict[str, list[int]]]]:
    """Per block (by index) its share of the grid, for the blocks that have any."""
    return [(info.index, grid) for info in db.blocks if (grid := block_grid(info, anchors))]


@dataclass
class AnchorFanout:
    """The coordinator's side: builds a database's anchors with the job's scorers (``LevelStore`` calls it)."""

    r: Any
    namespace: str
    context: dict[str, Any]  # what a scorer needs to rebuild the job's model and grid (the spec)
    workers: int
    send: Callable[[dict[str, Any], str], None]
    lease_s: float = 10.0
    poll_s: float = 0.05
    remote_blocks: int = 0  # blocks other processes built (the tests and the bench read them)
    local_blocks: int = 0
    requeued: int = 0
    seconds: float = 0.0
    holder: str = field(default_factory=lambda: f"coordinator@{socket.gethostname()}:{os.getpid()}")
    on_close: Callable[[], None] | None = None  # after the build (the broker connection the wake-ups used)

    def __call__(self, levels: Any, key: str, db: Any, anchors: dict[str, list[int]],
                 progress: Callable[[int, int], None] | None = None) -> None:
        t0 = time.perf_counter()
        grids = block_grids(db, anchors)
        todo = []
        for index, grid in grids:
            folder = levels.stored_anchor_part(key, grid)
            if folder is not None:  # built by an earlier attempt of this job
                db.load_anchors(folder, grid)
            else:
                todo.append((index, grid))
        total, done = len(anchors), len(db.anchors)  # progress in linears, as the one-process build reports it

        def step(grid: dict[str, list[int]]) -> None:
            nonlocal done
            done += len(grid)
            if progress is not None:
                progress(done, total)

        batch = f"{self.namespace}:anchors"

        def here(j: int) -> None:
            db.build_anchors(todo[j][1])
            self.local_blocks += 1
            step(todo[j][1])

        def collect(j: int, result: dict[str, Any]) -> None:
            folder = levels.stored_anchor_part(key, todo[j][1])
            if folder is None:
                raise RuntimeError(f"a scorer reported block {todo[j][0]}'s anchor levels stored, but they are not")
            db.load_anchors(folder, todo[j][1])
            self.remote_blocks += 1
            step(todo[j][1])

        try:
            if todo:
                post_batch(self.r, batch, [json.dumps({"block": index}) for index, _ in todo], range(len(todo)),
                           {"kind": "anchors", "leveldb_key": key}, f"{self.namespace}:alive")
                context = {**self.context, "kind": "anchors", "leveldb_key": key}
                for _ in range(min(self.workers - 1, len(todo) - 1)):
                    self.send(context, batch)
                self.requeued += drain_batch(self.r, batch, len(todo), self.holder, self.lease_s, self.poll_s,
                                             here, collect)
        finally:
            self.r.delete(*_keys(batch).values())
            if self.on_close is not None:
                self.on_close()
        db.anchors_loaded = False  # assembled here: the whole set is stored next
        levels.drop_anchor_parts(key, [g for _, g in grids])
        self.seconds = time.perf_counter() - t0
        db.anchor_seconds = self.seconds  # the wall time of the whole build, wherever it ran
        log.info("SparseGPT anchors of %d blocks: %d built here, %d by scorers, in %.1f s",
                 len(grids), self.local_blocks, self.remote_blocks, self.seconds)


def serve_anchor_batch(context: dict[str, Any], batch: str, r: Any, levels: Any, lease_s: float) -> int:
    """A scorer's side: build and store the anchors of the blocks it takes; returns how many."""
    from evosparse.jobs.spec import JobSpec
    from evosparse.pruning.layers import find_blocks
    from evosparse.pruning.leveldb import LevelDB, check_levels, load_levels
    from evosparse.pruning.loading import load_model
    from evosparse.worker.search_stage import level_kwargs, search_space, search_units

    if not r.exists(_keys(batch)["meta"]) or not r.llen(_keys(batch)["todo"]):
        return 0  # every block is taken already (the coordinator may have finished alone)
    spec = JobSpec.model_validate(context["spec"])
    key = context["leveldb_key"]
    folder = levels.local_copy(key)
    if folder is None:
        raise RuntimeError(f"level database {key} is not in the store")
    model, _ = load_model(spec.model, device=spec.device, dtype=spec.dtype)
    blocks = find_blocks(model)
    by_index = {info.index: info for info in blocks}
    units = search_units(blocks, spec.search.granularity)
    anchors = level_kwargs(spec, units, search_space(spec, units))["anchors"]
    device = next(model.parameters()).device
    check_levels(folder, "sparsegpt", blocks)  # once for the whole model; each item reads its block
    holder = f"scorer@{socket.gethostname()}:{os.getpid()}"

    def work(item: dict[str, Any]) -> dict[str, Any]:
        info = by_index[item["block"]]
        grid = block_grid(info, anchors)
        hessians = load_levels(folder, "sparsegpt", [info], device=device, checked=True)
        part = LevelDB(model, "sparsegpt", hessians=hessians, blocks=[info])
        part.build_anchors(grid)
        levels.store_anchor_part(key, part)
        return {"block": item["block"], "seconds": part.anchor_seconds}

    return serve_batch(r, batch, holder, lease_s, work)
