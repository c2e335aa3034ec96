"""HeadMajorAttention: the deploy form of a timm Attention with a low-rank qkv computes the same function
without the per-block reshapes and transposes, in torch and in onnxruntime."""

import collections

import numpy as np
import onnx
import pytest
import timm
import torch
from torch import nn

from vitcompress.api import apply
from vitcompress.export import ExportConfig, export_onnx, to_deploy
from vitcompress.layers.lowrank_attention import HeadMajorAttention
from vitcompress.layers.lowrank_linear import LowRankLinear
from vitcompress.runtime import open_session
from vitcompress.transforms.lowrank import LowRankConfig

INPUT = (1, 28, 28)


def tiny_vit(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=48, depth=2, num_heads=3, **kwargs).eval()


def factored(targets: list[str], **kwargs) -> nn.Module:
    return apply(tiny_vit(**kwargs), LowRankConfig(targets=targets, rank=8))


@pytest.mark.parametrize("targets", [["re:blocks\\.\\d+\\.attn\\.(qkv|proj)"], ["re:blocks\\.\\d+\\.attn\\.qkv"]],
                         ids=["qkv_and_proj", "qkv_only"])
def test_deploy_form_computes_the_same_logits(targets):
    model = factored(targets)
    deployed = to_deploy(model)
    assert all(isinstance(b.attn, HeadMajorAttention) for b in deployed.blocks)
    assert all(isinstance(b.attn.qkv, LowRankLinear) for b in model.blocks), "to_deploy changed its argument"
    x = torch.randn(5, *INPUT)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), model(x), rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in deployed.parameters()) == sum(p.numel() for p in model.parameters())


def test_qkv_without_bias_and_a_dense_model_are_handled():
    no_bias = factored(["re:blocks\\.\\d+\\.attn\\.qkv"], qkv_bias=False)
    x = torch.randn(2, *INPUT)
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


def test_onnx_has_no_per_block_transpose_and_matches_torch(tmp_path):
    model = factored(["re:blocks\\.\\d+\\.attn\\.(qkv|proj)"])
    path = export_onnx(model, tmp_path / "m.onnx", input_size=INPUT)
    ops = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    # the patch embedding's flatten and each block's kᵀ (onnxruntime folds it into the MatMul); no Split, no
    # transpose of q, k, v or the attention output
    assert ops["Transpose"] == 1 + len(model.blocks) and ops["Split"] == 0, ops
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
