"""One search on several processes: real `celery worker` scoring subprocesses on the embedded Redis.

The coordinator runs in this process (run_search with the service's scoring factory and level
store); the scorers are real Celery workers started from `evosparse serve`'s own command line.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
from evosparse.jobs.settings import Settings
from evosparse.jobs.spec import JobSpec
from evosparse.jobs.store import store_from_settings
from evosparse.pruning.data import get_windows
from evosparse.pruning.layers import find_blocks
from evosparse.pruning.loading import load_model
from evosparse.pruning.snapshot import DenseWeights
from evosparse.worker.leveldb_store import LevelStore
from evosparse.worker.scoring import _keys, redis_from_url
from evosparse.worker.search_stage import run_search
from evosparse.worker.tasks import anchor_fanout_for, scoring_for

from tests.service.servers import stop_process, wait_until


@pytest.fixture(scope="module")
def scoring_env(broker, model_root, tmp_path_factory):
    from evosparse.cli.service_cmd import start_embedded_redis

    root = tmp_path_factory.mktemp("scoring")
    # The scoring exchange on its own in-memory Redis, as `evosparse serve` runs it.
    server, scoring_url = start_embedded_redis(root / "scoring-redis.db", persistent=False)
    env = {
        "EVOSPARSE_BROKER_URL": broker,
        "EVOSPARSE_SCORING_REDIS_URL": scoring_url,
        "EVOSPARSE_DATA_DIR": str(root / "data"),
        "EVOSPARSE_STORE_URL": f"file://{root / 'store'}",
        "EVOSPARSE_WORK_DIR": str(root / "work"),
        "EVOSPARSE_SCORE_QUEUE": f"evs-score-{uuid.uuid4().hex[:8]}",
        "EVOSPARSE_QUEUE": f"evs-{uuid.uuid4().hex[:8]}",
        "EVOSPARSE_TORCH_THREADS": "1",
        "EVOSPARSE_SCORING_LEASE_S": "2",
        "EVOSPARSE_ALLOWED_MODEL_ROOTS": str(model_root),
    }
    yield root, env
    server.shutdown()


class Scorers:
    def __init__(self, root: Path, env: dict[str, str], n: int):
        from evosparse.cli.service_cmd import scorer_worker_cmd

        full = {k: v for k, v in os.environ.items() if not k.startswith("EVOSPARSE_")}
        full.update(env)
        full["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
        self.logs = [open(root / f"scorer-{i}.log", "a") for i in range(n)]
        self.names = [f"scorer{i}-{uuid.uuid4().hex[:6]}@{socket.gethostname()}" for i in range(n)]
        self.procs = [subprocess.Popen(scorer_worker_cmd(env["EVOSPARSE_SCORE_QUEUE"], name), env=full, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
                      for name, log in zip(self.names, self.logs, strict=True)]
        self._wait_ready(env)

    def _wait_ready(self, env: dict[str, str]) -> None:
        from evosparse.worker.celery_app import make_celery

        app = make_celery(Settings(broker_url=env["EVOSPARSE_BROKER_URL"]))
        wait_until(lambda: len(app.control.ping(destination=self.names, timeout=1.0)) == len(self.names),
                   90, "scoring workers to answer a ping")

    def stop(self) -> None:
        for p in self.procs:
            stop_process(p, grace=10)
        for log in self.logs:
            log.close()


def _job_env(scoring_env, monkeypatch) -> tuple[Path, dict[str, str], Settings]:  # noqa: ANN001
    """The test's process configured as a job worker of the scoring environment."""
    root, env = scoring_env
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return root, env, Settings()


def _spec(model_root: Path, workers: int, generations: int = 6, pruner: str = "wanda", **search) -> JobSpec:  # noqa: ANN003
    return JobSpec(model=str(model_root / "tiny"), sparsity=0.6, pruner=pruner, allocation="evolutionary",
                   calib_windows=8, seq_len=32, seed=3,
                   search={"generations": generations, "offspring": 8, "selection": "64:3,256:1",
                           "seed_from": "uniform", "granularity": "module", "workers": workers,
                           "time_budget_min": None, **search})


def _coordinate(spec: JobSpec, settings: Settings, namespace: str, killer=None):  # noqa: ANN001, ANN202
    """What the job task does for the search: model, windows, snapshot, level store, scoring factory."""
    torch.set_num_threads(1)
    model, tok = load_model(spec.model)
    blocks = find_blocks(model)
    calib = get_windows(spec.calib, tok, spec.calib_windows, spec.seq_len, "calib", spec.seed)
    levels = LevelStore(store_from_settings(settings), settings.resolved_work_dir / "leveldb")
    levels.anchor_fanout = anchor_fanout_for(namespace, spec, settings)
    made = []

    def scoring(local):  # noqa: ANN001, ANN202
        factory = scoring_for(namespace, spec, settings, levels)
        fitness = factory(local) if factory is not None else local
        made.append(fitness)
        if spec.search.workers > 1:  # the test waits for warm scorers (a job would start scoring alone)
            r = redis_from_url(settings.resolved_scoring_redis_url)
            wait_until(lambda: len(list(r.scan_iter(match=f"{namespace}:warm:*"))) == spec.search.workers - 1,
                       120, "scorers to load the job")
        if killer is not None:
            killer.start()
        return fitness

    out = run_search(model, calib, spec, None, blocks=blocks, dense=DenseWeights(blocks), levels=levels,
                     scoring=scoring)
    return out, levels, made[0]


def _same(a, b) -> None:  # noqa: ANN001
    assert a.best_levels == b.best_levels
    assert [r["best"] for r in a.history] == [r["best"] for r in b.history]
    assert [r["mean"] for r in a.history] == [r["mean"] for r in b.history]
    assert [r["candidates_scored"] for r in a.history] == [r["candidates_scored"] for r in b.history]
    assert a.counts == b.counts


def test_two_scoring_workers_give_exactly_the_one_process_search_and_reuse_the_stored_levels(
        scoring_env, model_root, monkeypatch):
    root, env, settings = _job_env(scoring_env, monkeypatch)
    scorers = Scorers(root, env, 2)
    try:
        alone, levels1, _ = _coordinate(_spec(model_root, workers=1), settings, "evosparse:score:t1:1")
        assert alone.leveldb == "built" and levels1.built == 1
        # A second job on the same model content, pruner and calibration data loads what the first stored.
        fanned, levels3, fitness = _coordinate(_spec(model_root, workers=3), settings, "evosparse:score:t3:1")
        assert fanned.leveldb == "loaded" and levels3.loaded == 1 and levels3.built == 0
        assert fitness.remote_scored > 0, "the scoring workers scored nothing"
        _same(fanned, alone)
        # Parent traces went through Redis: a parent another process scored was fetched, not recomputed.
        print("traces: coordinator fetched", fitness.local.traces_fetched, "rebuilt", fitness.local.traces_rebuilt,
              "published", fitness.traces.published)
        assert fitness.local.traces_fetched > 0
        # When the job is over the scorers' warm state is released (the alive key is gone), traces deleted.
        r = redis_from_url(env["EVOSPARSE_SCORING_REDIS_URL"])
        assert not r.exists("evosparse:score:t3:1:alive")
        assert not list(r.scan_iter(match="evosparse:score:t3:1:trace*"))
        # The exchange lived on the scoring Redis (the scorers' warm marks are still there), none on the broker.
        assert list(r.scan_iter(match="evosparse:score:t3:1:warm:*"))
        assert not list(redis_from_url(env["EVOSPARSE_BROKER_URL"]).scan_iter(match="evosparse:score:*"))
        # Fresh windows: each generation's window chunk travels with its batch, the scorers read the same windows.
        fresh = {"selection": "32:3,64:1", "fresh_windows": True, "validation_windows": 2}
        alone, _, _ = _coordinate(_spec(model_root, workers=1, **fresh), settings, "evosparse:score:f1:1")
        fanned, _, fitness = _coordinate(_spec(model_root, workers=3, **fresh), settings, "evosparse:score:f3:1")
        assert fitness.remote_scored > 0, "the scoring workers scored nothing"
        assert len({r["chunk"] for r in alone.history}) == 3  # 6 selection windows in chunks of 2
        _same(fanned, alone)
        assert [r["val"] for r in fanned.history] == [r["val"] for r in alone.history]
    finally:
        scorers.stop()


def test_a_scorer_killed_mid_candidate_changes_nothing(scoring_env, model_root, monkeypatch):
    root, env, settings = _job_env(scoring_env, monkeypatch)
    r = redis_from_url(env["EVOSPARSE_SCORING_REDIS_URL"])
    scorers = Scorers(root, env, 2)
    victim = scorers.procs[0]
    killed = threading.Event()

    def kill_when_it_holds_a_lease() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed.is_set():
            for key in r.scan_iter(match="evosparse:score:tk:1:*:lease:*", count=1000):
                holder = r.get(key)
                if holder is None or not holder.decode().endswith(f":{victim.pid}"):
                    continue
                # Freeze it first: an item takes milliseconds, so it may finish between the read above
                # and the kill. Frozen with its lease still held and no result written, it is mid-item.
                os.killpg(victim.pid, signal.SIGSTOP)
                batch, _, item = key.decode().rpartition(":lease:")
                if r.get(key) == holder and not r.hexists(_keys(batch)["done"], item):
                    os.killpg(victim.pid, signal.SIGKILL)  # mid-candidate: no ack, no result, no cleanup
                    killed.set()
                    return
                os.killpg(victim.pid, signal.SIGCONT)
            time.sleep(0.0005)

    try:
        alone, _, _ = _coordinate(_spec(model_root, workers=1, generations=10), settings, "evosparse:score:tk0:1")
        killer = threading.Thread(target=kill_when_it_holds_a_lease, daemon=True)
        fanned, _, fitness = _coordinate(_spec(model_root, workers=3, generations=10), settings,
                                         "evosparse:score:tk:1", killer=killer)
        killer.join(timeout=5)
        assert killed.is_set(), "the scorer was never caught holding a candidate"
        assert victim.poll() is not None
        assert fitness.requeued >= 1  # its candidate was scored again by another process
        _same(fanned, alone)
    finally:
        killed.set()
        scorers.stop()


def test_sparsegpt_anchor_levels_are_built_by_the_scorers_too_and_the_search_is_unchanged(
        scoring_env, model_root, monkeypatch, tmp_path):
    """The coordinator stores the Hessians, the scorers build blocks' anchor levels beside it, and
    the search that follows is exactly the one a single process runs with levels it built alone."""
    from evosparse.pruning.leveldb import LevelDB

    root, env, settings = _job_env(scoring_env, monkeypatch)
    scorers = Scorers(root, env, 2)
    try:
        spec = _spec(model_root, workers=3, pruner="sparsegpt", anchor_every=2)
        with monkeypatch.context() as m:
            # Slow the coordinator's own blocks (this process only): the scorers, still loading the
            # model when the build starts, must get some of the tiny model's four blocks.
            build = LevelDB.build_anchors

            def slow_build(self, anchors, progress=None):  # noqa: ANN001, ANN202
                time.sleep(1.5)
                return build(self, anchors, progress)

            m.setattr(LevelDB, "build_anchors", slow_build)
            fanned, levels, _ = _coordinate(spec, settings, "evosparse:score:ta:1")
        fanout = levels.anchor_fanout
        assert fanned.leveldb == "built"
        assert fanout.remote_blocks > 0, "the scorers built no anchor levels"
        assert fanout.local_blocks + fanout.remote_blocks == 4
        # The assembled set is stored whole (what the search's scorers read); the parts are gone.
        stored = [p for p in (root / "store" / "leveldb").iterdir() if "-anchors-" in p.name]
        assert len(stored) == 1, stored
        assert len(json.loads((stored[0] / "meta.json").read_text())["anchors"]) == 4 * 7  # every linear
        # The same search on one process, with a store of its own: every level built here.
        alone_settings = Settings(store_url=f"file://{tmp_path / 'alone-store'}", work_dir=str(tmp_path / "work"))
        alone, alone_levels, _ = _coordinate(_spec(model_root, workers=1, pruner="sparsegpt", anchor_every=2),
                                             alone_settings, "evosparse:score:ta1:1")
        assert alone.leveldb == "built" and alone_levels.anchor_fanout is None
        _same(fanned, alone)
    finally:
        scorers.stop()


def test_anchor_parts_an_earlier_attempt_stored_are_read_not_built_again(scoring_env, tiny_llama, tiny_tokens,
                                                                         tmp_path):
    """A coordinator that died after scorers stored some blocks: the next attempt reads those parts,
    builds only the rest, and assembles the same levels a one-process build gives; parts are dropped."""
    from evosparse.jobs.store import LocalStore
    from evosparse.pruning.leveldb import LevelDB
    from evosparse.worker.anchor_build import AnchorFanout, block_grids

    _, env = scoring_env
    torch.set_num_threads(1)
    blocks = find_blocks(tiny_llama)
    anchors = {n: [m.weight.numel() // 4, m.weight.numel() // 2] for b in blocks for n, m in b.linears.items()}
    reference = LevelDB.build(tiny_llama, tiny_tokens, "sparsegpt", anchors=anchors)
    levels = LevelStore(LocalStore(tmp_path / "store"), tmp_path / "scratch")
    sent: list[str] = []
    levels.anchor_fanout = AnchorFanout(redis_from_url(env["EVOSPARSE_SCORING_REDIS_URL"]), "evosparse:score:tp:1",
                                        {}, 3, lambda context, batch: sent.append(batch))
    key = levels.key_for(tiny_llama, tiny_tokens, "sparsegpt")
    grids = block_grids(reference, anchors)
    for index, grid in grids[:2]:  # what scorers of the earlier attempt stored
        part = LevelDB(tiny_llama, "sparsegpt", hessians={n: reference.hessian[n] for n in grid},
                       blocks=[b for b in blocks if b.index == index])
        part.build_anchors(grid)
        levels.store_anchor_part(key, part)
    assert levels.stored_anchor_part(key, grids[0][1]) is not None
    db = levels.build(tiny_llama, tiny_tokens, "sparsegpt", anchors=anchors)
    fanout = levels.anchor_fanout
    assert (fanout.local_blocks, fanout.remote_blocks) == (2, 0) and len(sent) == 1  # 2 blocks left: 1 wake-up
    for name, counts in anchors.items():
        for c in counts:
            assert torch.equal(db.pruned_weight(name, c), reference.pruned_weight(name, c))
    assert all(levels.stored_anchor_part(key, g) is None for _, g in grids)  # parts dropped once assembled
    assert levels.anchors_stored == 1  # the whole set, stored for the search's scorers
