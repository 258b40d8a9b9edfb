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


def test_sparsegpt_anchor_levels_are_stored_once_and_read_back_bit_for_bit(tiny_llama, tiny_tokens, tmp_path):
    from evosparse.pruning.layers import find_blocks

    store = LocalStore(tmp_path / "store")
    sizes = {n: weight_matrix(m).numel() for b in find_blocks(tiny_llama) for n, m in b.linears.items()}
    anchors = {n: [s // 4, s // 2] for n, s in sizes.items()}
    first = LevelStore(store, tmp_path / "scratch-coordinator")
    built = first.build(tiny_llama, tiny_tokens, "sparsegpt", anchors=anchors)
    assert not built.anchors_loaded and built.anchor_levels() == 2 * len(sizes)
    assert store.is_complete(first.prefix(first.anchor_key(first.last_key, anchors)))
    # Another machine (a scoring worker, a later job: empty scratch) reads them instead of building them.
    loaded = LevelStore(store, tmp_path / "scratch-scorer").load(tiny_llama, tiny_tokens, "sparsegpt", anchors=anchors)
    assert loaded is not None and loaded.anchors_loaded and loaded.anchor_levels() == built.anchor_levels()
    assert (first.anchors_stored, first.anchors_read) == (1, 0)
    for name, size in sizes.items():
        for count in (size // 4, size // 2, size // 4 + 3):  # the anchors, and a level derived between them
            assert torch.equal(loaded.pruned_weight(name, count), built.pruned_weight(name, count))
    # Another level grid is not what was stored: built, then stored under its own name.
    other = {n: [s // 3] for n, s in sizes.items()}
    third = LevelStore(store, tmp_path / "scratch-other")
    assert not third.load(tiny_llama, tiny_tokens, "sparsegpt", anchors=other).anchors_loaded
    assert store.is_complete(third.prefix(third.anchor_key(third.last_key, other)))


def test_anchor_folders_of_another_layout_are_not_read(tiny_llama, tiny_tokens, tmp_path):
    """Anchors stored before they were packed (no ``anchor_format``) are rebuilt, not misread."""
    import json

    from evosparse.pruning.layers import find_blocks
    from evosparse.pruning.leveldb import LevelDB, stored_anchors_match

    anchors = {n: [weight_matrix(m).numel() // 2] for b in find_blocks(tiny_llama) for n, m in b.linears.items()}
    db = LevelDB.build(tiny_llama, tiny_tokens, "sparsegpt", anchors=anchors)
    db.save_anchors(tmp_path / "a")
    assert stored_anchors_match(tmp_path / "a", anchors)
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    del meta["anchor_format"]
    (tmp_path / "a" / "meta.json").write_text(json.dumps(meta))
    assert not stored_anchors_match(tmp_path / "a", anchors)
