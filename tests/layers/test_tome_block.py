import math

import pytest
import torch
from timm.models.vision_transformer import Attention, Block

from vitcompress.layers.token_merge import (
    ToMeAttention,
    ToMeBlock,
    ToMeBlocks,
    bipartite_soft_matching,
    max_merge,
    merge_weighted,
)

DIM, HEADS, TOKENS = 96, 3, 50


def _tokens(batch: int = 2, tokens: int = TOKENS, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, tokens, DIM, generator=torch.Generator().manual_seed(seed))


def _block(seed: int = 0) -> Block:
    torch.manual_seed(seed)
    return Block(DIM, HEADS, qkv_bias=True, init_values=0.5).eval()


def _loop_merge(x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, r: int):
    """One image, plain Python: A = even positions, B = odd; each A token's best B by cosine similarity over all
    pairs; the r A tokens (not the class token) with the highest best similarity go into their B token as
    size-weighted means. Returns (tokens, sizes) in the documented order: unmerged A ascending, then B."""
    n = x.shape[0]
    a_pos, b_pos = list(range(0, n, 2)), list(range(1, n, 2))
    best = {}
    for i in a_pos[1:]:
        sims = [torch.nn.functional.cosine_similarity(metric[i], metric[j], dim=0).item() for j in b_pos]
        best[i] = (max(sims), b_pos[sims.index(max(sims))])
    merged_away = sorted(best, key=lambda i: best[i][0], reverse=True)[:r]
    total = {j: (x[j] * size[j], size[j].clone()) for j in b_pos}
    for i in merged_away:
        j = best[i][1]
        total[j] = (total[j][0] + x[i] * size[i], total[j][1] + size[i])
    kept = [i for i in a_pos if i not in merged_away]
    tokens = [x[i] for i in kept] + [total[j][0] / total[j][1] for j in b_pos]
    sizes = [size[i] for i in kept] + [total[j][1] for j in b_pos]
    return torch.stack(tokens), torch.stack(sizes)


@pytest.mark.parametrize(("tokens", "r"), [(50, 7), (49, 24), (12, 1)])
def test_one_merge_step_equals_a_direct_loop(tokens, r):
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(3, tokens, 8, generator=gen, dtype=torch.float64)
    metric = torch.randn(3, tokens, 5, generator=gen, dtype=torch.float64)
    metric[:, 0] = metric[:, 1]  # the class token is the most similar token of all, and still never merged
    size = torch.randint(1, 5, (3, tokens, 1), generator=gen).double()
    got, got_size = merge_weighted(x, size, bipartite_soft_matching(metric, r))
    assert got.shape == (3, tokens - r, 8)
    for image in range(3):
        want, want_size = _loop_merge(x[image], size[image], metric[image], r)
        torch.testing.assert_close(got[image], want)
        torch.testing.assert_close(got_size[image], want_size)
    torch.testing.assert_close(got[:, 0], x[:, 0], msg="the class token is not at position 0 any more")


def test_merged_sizes_sum_to_the_token_count_through_a_stack_of_blocks():
    x = _tokens()
    size = None
    with torch.no_grad():
        for seed in range(4):
            x, size = ToMeBlock.from_block(_block(seed), r=5)(x, size)
    assert x.shape == (2, TOKENS - 20, DIM)
    torch.testing.assert_close(size.sum(dim=(1, 2)), torch.full((2,), float(TOKENS)))
    assert (size >= 1).all() and size.max() > 1


def test_r_zero_is_the_original_block():
    block = _block()
    x = _tokens()
    with torch.no_grad():
        got, size = ToMeBlock.from_block(block, r=0)(x)
        assert torch.equal(got, block(x)) and size is None


def test_r_is_clamped_to_what_one_step_can_merge():
    x = _tokens(tokens=11)
    with torch.no_grad():
        got, size = ToMeBlock.from_block(_block(), r=100)(x)
    assert max_merge(11) == 5 and got.shape[1] == 11 - 5 and size.sum().item() == 2 * 11


def _proportional_reference(attn: Attention, x: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ/√d + log s) v written out, in float64."""
    q, k, v = (attn.qkv(x).double().reshape(*x.shape[:2], 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4))
    logits = q @ k.transpose(-2, -1) / math.sqrt(DIM // HEADS) + size.double().log().transpose(1, 2)[:, None]
    heads = logits.softmax(-1) @ v
    return attn.proj(heads.transpose(1, 2).reshape(x.shape).float())


def test_proportional_attention():
    attn = _block().attn
    layer = ToMeAttention.from_attention(attn)
    x = _tokens()
    sizes = torch.randint(1, 6, (2, TOKENS, 1), generator=torch.Generator().manual_seed(0)).float()
    with torch.no_grad():
        ones, metric = layer(x, torch.ones(2, TOKENS, 1))
        torch.testing.assert_close(ones, attn(x), msg="all sizes 1 must be plain attention")
        weighted, _ = layer(x, sizes)
        torch.testing.assert_close(weighted, _proportional_reference(attn, x, sizes))
        assert (weighted - ones).abs().max() > 1e-2, "the sizes changed nothing: the test would be vacuous"
        k = attn.qkv(x).reshape(2, TOKENS, 3, HEADS, DIM // HEADS)[:, :, 1]
        torch.testing.assert_close(metric, k.mean(dim=2), msg="the metric is the keys averaged over heads")


def test_shares_weights_keeps_state_dict_keys_and_refuses_negative_r():
    block = _block()
    tome = ToMeBlock.from_block(block, r=3)
    assert tome.attn.qkv is block.attn.qkv and tome.mlp is block.mlp and tome.ls1 is block.ls1
    assert list(tome.state_dict()) == list(block.state_dict())
    container = ToMeBlocks(tome, _block(1))
    assert list(container.state_dict()) == [f"{i}.{k}" for i in range(2) for k in block.state_dict()]
    with pytest.raises(ValueError, match="r must be"):
        ToMeBlock.from_block(block, r=-1)
