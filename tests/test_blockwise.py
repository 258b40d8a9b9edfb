import torch
from evosparse.pruning.blockwise import capture_block_inputs, head_logits, run_block
from evosparse.pruning.layers import find_blocks, prunable_linears, weight_matrix


def _blockwise_logits(model, tokens):
    inputs = capture_block_inputs(model, tokens)
    hidden = inputs.hidden
    for block in find_blocks(model):
        hidden = run_block(block.module, hidden, inputs.kwargs, batch_size=3)
    return head_logits(model, hidden)


def test_blockwise_forward_matches_full_forward(tiny_llama, tiny_gpt2, tiny_tokens):
    for model in (tiny_llama, tiny_gpt2):
        with torch.no_grad():
            full = model(input_ids=tiny_tokens).logits
        torch.testing.assert_close(_blockwise_logits(model, tiny_tokens), full, rtol=1e-4, atol=1e-4)


def test_discovery_finds_glu_groups_and_out_in_weights(tiny_llama, tiny_gpt2):
    blocks = find_blocks(tiny_llama)
    assert len(blocks) == 4
    assert blocks[1].glu == (
        "model.layers.1.mlp.gate_proj",
        "model.layers.1.mlp.up_proj",
        "model.layers.1.mlp.down_proj",
    )
    assert [n.removeprefix("model.layers.0.") for n in blocks[0].linears] == [
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    ]
    gpt_linears = prunable_linears(tiny_gpt2)
    fc = gpt_linears["transformer.h.0.mlp.c_fc"]
    assert weight_matrix(fc).shape == (256, 64)  # [out, in] although Conv1D stores [in, out]
    weight_matrix(fc)[0, 0] = 0.0
    assert fc.weight[0, 0] == 0.0
    assert find_blocks(tiny_gpt2)[0].glu is None
    assert "lm_head" not in " ".join(prunable_linears(tiny_llama))
