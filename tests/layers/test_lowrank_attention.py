"""HeadMajorAttention and AbsorbedAttention: the deploy forms of a timm Attention with a low-rank qkv (and proj)
compute the same function without the per-block reshapes and transposes, in torch and in onnxruntime."""

import collections

import numpy as np
import onnx
import pytest
import timm
import torch
from torch import nn

from vitcompress.api import apply
from vitcompress.deploy.runtime import open_session
from vitcompress.export import export_onnx, to_deploy
from vitcompress.export_config import ExportConfig
from vitcompress.layers.lowrank_attention import AbsorbedAttention, HeadMajorAttention
from vitcompress.layers.lowrank_linear import LowRankLinear
from vitcompress.transforms.lowrank import LowRankConfig

INPUT = (1, 28, 28)


def tiny_vit(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=48, depth=2, num_heads=3, **kwargs).eval()


def factored(targets: list[str], rank: int = 8, **kwargs) -> nn.Module:
    """tiny_vit (head dimension 16) with random biases (timm starts them at zero, which would hide the bias terms
    the deploy forms move around), ``targets`` factored at ``rank``."""
    model = tiny_vit(**kwargs)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):
                parameter.normal_(0, 0.5)
    return apply(model, LowRankConfig(targets=targets, rank=rank))


@pytest.mark.parametrize(("targets", "rank", "form"), [
    (["re:blocks\\.\\d+\\.attn\\.(qkv|proj)"], 8, AbsorbedAttention),
    (["re:blocks\\.\\d+\\.attn\\.(qkv|proj)"], 16, HeadMajorAttention),
    (["re:blocks\\.\\d+\\.attn\\.qkv"], 8, HeadMajorAttention),
], ids=["qkv_and_proj_absorbed", "rank_at_head_dim", "qkv_only"])
def test_deploy_form_computes_the_same_logits(targets, rank, form):
    model = factored(targets, rank)
    deployed = to_deploy(model)
    assert all(type(b.attn) is form for b in deployed.blocks)
    assert all(isinstance(b.attn.qkv, LowRankLinear) for b in model.blocks), "to_deploy changed its argument"
    x = torch.randn(5, *INPUT)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), model(x), rtol=1e-4, atol=1e-5)
    if form is HeadMajorAttention:
        assert sum(p.numel() for p in deployed.parameters()) == sum(p.numel() for p in model.parameters())


def test_absorbed_attention_has_fewer_macs_and_matches_on_a_deit_architecture(tmp_path):
    """DeiT-S widths (6 heads of 64) at rank 1/8 as the fast recipe: the absorbed form has fewer MACs and the
    same logits in torch and onnxruntime."""
    from vitcompress.measure import count_macs

    torch.manual_seed(0)
    deit = timm.create_model("deit_small_patch16_224", pretrained=False, depth=1, img_size=64).eval()
    with torch.no_grad():
        for name, parameter in deit.named_parameters():
            if name.endswith(".bias"):
                parameter.normal_(0, 0.5)
    model = apply(deit, LowRankConfig(targets=["re:blocks\\.\\d+\\.attn\\.(qkv|proj)"], rank_ratio=0.125))
    deployed = to_deploy(model)
    assert type(deployed.blocks[0].attn) is AbsorbedAttention
    size = (3, 64, 64)
    assert count_macs(deployed, size) < count_macs(to_deploy(model, head_major=False), size)
    path = export_onnx(model, tmp_path / "deit.onnx", input_size=size)
    x = np.random.default_rng(0).standard_normal((2, *size), dtype=np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(open_session(path).run(None, {"input": x})[0], want, rtol=1e-4, atol=1e-4)


def test_qkv_without_bias_and_a_dense_model_are_handled():
    x = torch.randn(2, *INPUT)
    for targets in (["re:blocks\\.\\d+\\.attn\\.qkv"], ["re:blocks\\.\\d+\\.attn\\.(qkv|proj)"]):
        no_bias = factored(targets, qkv_bias=False)
        with torch.no_grad():
            torch.testing.assert_close(to_deploy(no_bias)(x), no_bias(x), rtol=1e-4, atol=1e-5)
    dense = tiny_vit()
    assert not any(isinstance(m, HeadMajorAttention) for m in to_deploy(dense).modules())


def test_only_a_plain_timm_attention_is_accepted():
    qk_norm = factored(["re:blocks\\.\\d+\\.attn\\.qkv"], qk_norm=True)
    assert not HeadMajorAttention.accepts(qk_norm.blocks[0].attn)
    assert not any(isinstance(m, HeadMajorAttention) for m in to_deploy(qk_norm).modules())
    with pytest.raises(TypeError, match="low-rank qkv"):
        HeadMajorAttention.from_attention(tiny_vit().blocks[0].attn)
    with pytest.raises(ValueError, match="no attention mask"):
        to_deploy(factored(["blocks.0.attn.qkv"])).blocks[0].attn(torch.zeros(1, 17, 48), attn_mask=torch.zeros(17, 17))
    both = factored(["re:blocks\\.\\d+\\.attn\\.(qkv|proj)"])
    with pytest.raises(ValueError, match="no attention mask"):
        to_deploy(both).blocks[0].attn(torch.zeros(1, 17, 48), is_causal=True)
    assert not AbsorbedAttention.accepts(factored(["re:blocks\\.\\d+\\.attn\\.qkv"]).blocks[0].attn)
    with pytest.raises(TypeError, match="below its head dimension"):
        AbsorbedAttention.from_attention(factored(["re:blocks\\.\\d+\\.attn\\.(qkv|proj)"], rank=16).blocks[0].attn)


def test_onnx_has_no_per_block_transpose_and_matches_torch(tmp_path):
    model = factored(["re:blocks\\.\\d+\\.attn\\.(qkv|proj)"])
    path = export_onnx(model, tmp_path / "m.onnx", input_size=INPUT)
    ops = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    # the patch embedding's flatten and, per block, kᵀ (onnxruntime folds it into the MatMul) and the rank-r_p
    # values put head-major; no Split, no transpose of q, k or the attention output
    assert ops["Transpose"] == 1 + 2 * len(model.blocks) and ops["Split"] == 0, ops
    x = np.random.default_rng(0).standard_normal((4, *INPUT), dtype=np.float32)
    got = open_session(path).run(None, {"input": x})[0]
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_head_major_false_keeps_timms_layout_with_the_same_logits(tmp_path):
    model = factored(["re:blocks\\.\\d+\\.attn\\.(qkv|proj)"])
    assert not any(isinstance(m, HeadMajorAttention) for m in to_deploy(model, head_major=False).modules())
    path = export_onnx(model, tmp_path / "m.onnx", input_size=INPUT, config=ExportConfig(head_major=False))
    ops = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    assert ops["Transpose"] > 1 + len(model.blocks), ops
    x = np.random.default_rng(0).standard_normal((4, *INPUT), dtype=np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(open_session(path).run(None, {"input": x})[0], want, rtol=1e-4, atol=1e-5)
