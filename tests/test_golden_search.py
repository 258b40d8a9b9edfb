"""The same seed gives the same job: best vector, history, per-layer sparsity and perplexities as recorded.

tests/data/golden_tiny_search.json was written by ``python -m tests.golden_search --record`` before
the runner was split into stages; the refactor (and any later one) must reproduce it: the same
best vector, the same parent in every generation, the same candidate counts, exactly. Scores and
perplexities are compared to 1e-4 relative: float32 sums in the same order are bit-identical on
one machine, but a new torch or transformers release may reorder a kernel's sums (transformers
5.24 moved the recorded scores by ~7e-6 relative without changing a single decision).
"""

from __future__ import annotations

import json

import pytest

from tests.golden_search import GOLDEN, run_golden


def test_tiny_evolutionary_job_reproduces_the_recorded_search(tiny_llama_dir):
    expected = json.loads(GOLDEN.read_text())
    got = run_golden(tiny_llama_dir)
    assert got["best_vector"] == expected["best_vector"]
    assert [r["best_levels"] for r in got["history"]] == [r["best_levels"] for r in expected["history"]]
    for g, e in zip(got["history"], expected["history"], strict=True):
        assert g["candidates"] == e["candidates"] and g["candidates_scored"] == e["candidates_scored"]
        assert g["best"] == pytest.approx(e["best"], rel=1e-4)
        assert g["mean"] == pytest.approx(e["mean"], rel=1e-4)
    assert got["layer_sparsity"] == pytest.approx(expected["layer_sparsity"], rel=1e-9)
    assert got["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-4)
