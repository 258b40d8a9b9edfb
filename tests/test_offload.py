"""pruning/offload.py: a model whose blocks live in host memory and visit the device one at a time
gives the resident model's bits, with the level database pruning the host weights in between."""

from __future__ import annotations

import random

import pytest
import torch
from evosparse.pruning.evaluate import perplexity
from evosparse.pruning.layers import find_blocks, weight_matrix
from evosparse.pruning.offload import block_bytes, offload_blocks, offload_of
from evosparse.search.operators import mutate

from tests.conftest import make_tiny_llama
from tests.test_leveldb_fitness import make_fitness


def _candidates(space, n: int = 6) -> list[tuple[int, ...]]:
    rng = random.Random(1)
    parent = mutate(space, space.zero(), rng, switches=3)
    return [parent] + [mutate(space, parent, rng) for _ in range(n)]


def test_offloaded_fitness_equals_the_resident_one_bit_for_bit(tiny_tokens):
    resident, space = make_fitness(make_tiny_llama(), tiny_tokens, batch_windows=2)
    model = make_tiny_llama()
    handle = offload_blocks(model, "cpu")
    streamed, _ = make_fitness(model, tiny_tokens, batch_windows=2)
    vectors = _candidates(space)
    for fit in (resident, streamed):
        fit.set_parent(vectors[0])
    got = [(streamed(v, 32), streamed(v, 96)) for v in vectors]
    want = [(resident(v, 32), resident(v, 96)) for v in vectors]
    assert got == want
    # Every block forward went through a device copy: the bytes moved are whole blocks.
    per_block = block_bytes(model) // len(find_blocks(model))
    assert handle.visits > 0 and handle.bytes_copied == handle.visits * per_block
    assert offload_of(model) is handle


def test_pruning_the_host_weights_reaches_the_next_forward_and_perplexity_runs(tiny_tokens):
    model = make_tiny_llama()
    dense_ppl = perplexity(model, tiny_tokens)
    offload_blocks(model, "cpu")
    assert perplexity(model, tiny_tokens) == pytest.approx(dense_ppl, rel=1e-6)
    mlp = find_blocks(model)[1].module.mlp.down_proj
    host = weight_matrix(mlp)
    with torch.no_grad():
        host.zero_()  # in place on the host tensor, as the level database does
    assert perplexity(model, tiny_tokens) != pytest.approx(dense_ppl, rel=1e-6)
    assert weight_matrix(mlp).data_ptr() == host.data_ptr()  # still the host tensor between forwards


def test_a_forward_that_raises_leaves_the_host_weights_in_place():
    model = make_tiny_llama()
    offload_blocks(model, "cpu")
    block = find_blocks(model)[0].module
    before = [p.data_ptr() for p in block.parameters()]
    with pytest.raises(Exception):  # noqa: B017 - any error inside the block's forward
        block(torch.zeros(1, 4, 3))  # wrong hidden size
    assert [p.data_ptr() for p in block.parameters()] == before


@pytest.mark.parametrize("pruner", ["wanda", "sparsegpt"])
def test_a_whole_job_on_an_offloaded_model_gives_the_resident_jobs_result(tiny_llama_dir, tmp_path, monkeypatch,
                                                                          pruner):
    from evosparse.jobs.spec import JobSpec
    from evosparse.pruning import offload
    from evosparse.worker.runner import run_job

    from tests.golden_search import golden_spec, summary

    raw = golden_spec(tiny_llama_dir)
    raw["pruner"] = pruner
    raw["search"] = {**raw["search"], "seed_from": "hessian", "generations": 3}
    spec = JobSpec.model_validate(raw)
    resident = run_job(spec, tmp_path / "resident")
    # As if the model did not fit on the device: load_model offloads its blocks (on the CPU the copies
    # are still made, so this runs the path a GPU takes).
    monkeypatch.setattr(offload, "fits_on", lambda *a, **k: False)
    offloaded = run_job(spec, tmp_path / "offloaded")
    assert (resident["blocks_offloaded"], offloaded["blocks_offloaded"]) == (False, True)
    assert summary(offloaded) == summary(resident)


def test_an_offloaded_model_refuses_the_gradient_seed_with_a_clear_error(tiny_llama_dir, tmp_path, monkeypatch):
    from evosparse.jobs.spec import JobSpec
    from evosparse.pruning import offload
    from evosparse.pruning.errors import PruningConfigError
    from evosparse.worker.runner import run_job

    from tests.golden_search import golden_spec

    monkeypatch.setattr(offload, "fits_on", lambda *a, **k: False)
    with pytest.raises(PruningConfigError, match="larger than the device"):
        run_job(JobSpec.model_validate(golden_spec(tiny_llama_dir)), tmp_path / "o")
    assert not (tmp_path / "o").exists()
