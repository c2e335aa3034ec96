import copy

import torch
from timm.models.vision_transformer import Attention

from vitcompress.layers.binary_attention import (
    BinaryAttention,
    binary_attention,
    binary_attention_deploy,
    binary_attention_quadratic,
    binary_codes,
)


def test_codes_are_binary_per_token_and_pass_gradients():
    x = torch.randn(2, 3, 10, 16, requires_grad=True)
    codes = binary_codes(x)
    assert set(codes.detach().unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(binary_codes(x[:1]), codes[:1]), "a token's code ignores the rest of the batch"
    (codes * torch.randn_like(codes)).sum().backward()
    assert x.grad.abs().sum() > 0


def test_linear_form_equals_quadratic_evaluation():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 50, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(binary_attention(q, k, v), binary_attention_quadratic(q, k, v))


def test_output_is_a_convex_combination_of_values():
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 1, 20, 8, generator=gen), torch.randn(1, 1, 20, 8, generator=gen)
    v = torch.rand(1, 1, 20, 8, generator=gen)
    out = binary_attention(q, k, v)
    assert (out >= v.min(-2, keepdim=True).values - 1e-6).all() and (out <= v.max(-2, keepdim=True).values + 1e-6).all()


def test_from_attention_shares_weights_and_gradients_reach_qkv():
    torch.manual_seed(0)
    attn = Attention(48, num_heads=3)
    layer = BinaryAttention.from_attention(copy.deepcopy(attn))
    assert layer.qkv.weight.shape == attn.qkv.weight.shape
    x = torch.randn(2, 10, 48)
    layer(x).sum().backward()
    assert layer.qkv.weight.grad.abs().sum() > 0 and layer.proj.weight.grad.abs().sum() > 0


def test_deploy_form_equals_the_training_form():
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 40, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(binary_attention_deploy(q, k, v), binary_attention(q, k, v))


def test_to_deploy_keeps_the_modules_and_the_output():
    torch.manual_seed(3)
    layer = BinaryAttention.from_attention(Attention(48, num_heads=3)).eval()
    deployed = layer.to_deploy()
    assert deployed.qkv is layer.qkv and deployed.proj is layer.proj and deployed.deploy and not layer.deploy
    x = torch.randn(2, 10, 48, dtype=torch.float64)
    torch.testing.assert_close(deployed.double()(x), layer.double()(x))
