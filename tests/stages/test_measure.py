from vitcompress.measure import count_macs, count_params


def test_macs_of_reference_model_match_the_analytic_count(reference_model):
    """Per block: qkv + proj + fc1 + fc2 linears and the two n² attention matmuls (n = 50 tokens, C = 192)."""
    n, c, hidden = 50, 192, 768
    block = n * c * 3 * c + n * c * c + 2 * n * c * hidden + 2 * n * n * c
    patch_embed, head = 49 * 16 * c, c * 10
    before = [b.attn.fused_attn for b in reference_model.blocks]
    assert count_macs(reference_model, (1, 28, 28)) == 12 * block + patch_embed + head
    assert [b.attn.fused_attn for b in reference_model.blocks] == before, "fused_attn must be restored"
    assert count_params(reference_model) == 5_353_738


def test_int8_deploy_layers_count_their_frozen_weights():
    """A shift Linear in its int8 deploy form holds its weights as buffers; they are still the model's weights."""
    from torch import nn

    from vitcompress.layers.shift_linear import ShiftLinear

    linear = nn.Linear(48, 32)
    deployed = nn.Sequential(ShiftLinear.from_linear(linear, int8=True).to_deploy())
    assert count_params(deployed) == count_params(linear) == 48 * 32 + 32
