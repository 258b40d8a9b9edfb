"""worker/leveldb_store.py: stored level databases are reused, and a machine's local copies stay bounded."""

from __future__ import annotations

import torch
from evosparse.jobs.store import LocalStore
from evosparse.pruning.layers import weight_matrix
from evosparse.worker.leveldb_store import LevelStore


def test_local_copies_past_the_cap_are_dropped_least_recently_used_first(tiny_llama, tiny_tokens, tmp_path):
    levels = LevelStore(LocalStore(tmp_path / "store"), tmp_path / "scratch", scratch_bytes=1,
                        scratch_min_age_s=0)
    other_tokens = (tiny_tokens + 1) % 256  # other calibration data: another database
    first = levels.build(tiny_llama, tiny_tokens, "wanda")
    first_key = levels.last_key
    levels.build(tiny_llama, other_tokens, "wanda")
    second_key = levels.last_key
    assert first_key != second_key
    # A cap of 1 byte keeps only the copy in use: the first one's local copy is gone, the store's is not.
    assert [p.name for p in (tmp_path / "scratch").iterdir() if not p.name.startswith(".")] == [second_key]
    assert levels.store.is_complete(levels.prefix(first_key))
    again = levels.load(tiny_llama, tiny_tokens, "wanda")  # downloaded again from the store
    assert again is not None and levels.last_key == first_key
    name = next(iter(first.modules))
    count = weight_matrix(first.modules[name]).numel() // 2
    assert torch.equal(again.pruned_weight(name, count), first.pruned_weight(name, count))
    assert [p.name for p in (tmp_path / "scratch").iterdir() if not p.name.startswith(".")] == [first_key]


def test_copies_in_recent_use_are_kept_even_past_the_cap(tiny_llama, tiny_tokens, tmp_path):
    levels = LevelStore(LocalStore(tmp_path / "store"), tmp_path / "scratch", scratch_bytes=1)
    levels.build(tiny_llama, tiny_tokens, "wanda")
    levels.build(tiny_llama, (tiny_tokens + 1) % 256, "wanda")
    assert len([p for p in (tmp_path / "scratch").iterdir() if not p.name.startswith(".")]) == 2
