"""``token_merge``: ToMe token merging in the blocks of a timm ViT (Bolya et al., ICLR 2023). Training-free.

Each target block becomes a :class:`~vitcompress.layers.token_merge.ToMeBlock` that merges ``r`` tokens
(size-weighted) between its attention and its MLP, and ``model.blocks`` becomes a
:class:`~vitcompress.layers.token_merge.ToMeBlocks` that carries the token sizes from block to block. Blocks
after the first target that are not targets themselves get ``r = 0``: they merge nothing but still use
proportional attention, which merged tokens need (without it a token standing for 5 patches weighs as 1).

Supported: a timm ``VisionTransformer`` with ``global_pool='token'``, one prefix (class) token and softmax
``Attention`` in its blocks. ``global_pool='avg'`` is refused: after merging, tokens stand for different numbers
of patches, so the plain mean that timm's head takes would be wrong (it would need the sizes as weights).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, ClassVar, Literal, Union

from pydantic import Field, NonNegativeInt

from vitcompress.errors import TargetError
from vitcompress.transforms.registry import TransformConfig, TransformInputs, register
from vitcompress.transforms.select import select_modules

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)
STEP = "token_merge"


class TokenMergeConfig(TransformConfig):
    keeps_token_count: ClassVar[bool] = False

    transform: Literal["token_merge"] = "token_merge"
    targets: list[str] = Field(default_factory=lambda: ["blocks.*"], min_length=1,
                               description="merging blocks (selectors); default every block")
    r: Union[NonNegativeInt, list[NonNegativeInt]] = Field(
        description="tokens merged per target block: one number for all, or one per target block in model "
                    "order; clamped to (tokens − 1) // 2 of the tokens a block sees")


def check_architecture(model: nn.Module) -> nn.Sequential:
    """``model.blocks`` if ``model`` is a timm ViT that ToMe supports; else a :class:`TargetError` saying why."""
    from torch import nn

    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or not hasattr(model, "global_pool"):
        raise TargetError(f"{STEP}: needs a timm VisionTransformer (a `blocks` Sequential and a global_pool), "
                          f"got {type(model).__name__}")
    if getattr(model, "attn_pool", None) is not None:
        raise TargetError(f"{STEP}: the head pools with attention ({type(model.attn_pool).__name__}), which ToMe "
                          "does not support: merged tokens stand for different numbers of patches, so its attention "
                          "would need the token sizes in its logits")
    if model.global_pool != "token":
        raise TargetError(
            f"{STEP}: global_pool {model.global_pool!r} is not supported, only 'token': merging leaves tokens that "
            "stand for different numbers of patches, so pooling over them would need the token sizes as weights")
    if getattr(model, "num_prefix_tokens", None) != 1 or getattr(model, "cls_token", None) is None:
        raise TargetError(f"{STEP}: needs exactly one prefix token, the class token (the model has "
                          f"{getattr(model, 'num_prefix_tokens', '?')} prefix tokens)")
    return blocks


def _per_block_r(config: TokenMergeConfig, names: list[str]) -> dict[str, int]:
    if isinstance(config.r, int):
        return dict.fromkeys(names, config.r)
    if len(config.r) != len(names):
        raise TargetError(f"{STEP}: r has {len(config.r)} values but the targets select {len(names)} blocks "
                          f"({names[0]} … {names[-1]})")
    return dict(zip(names, config.r))


@register(TokenMergeConfig)
def apply_token_merge(model: nn.Module, config: TokenMergeConfig, inputs: TransformInputs) -> list[str]:
    """Merge `r` similar tokens per block (ToMe, ICLR'23): bipartite soft matching on the attention keys, the
    class token never merged, size-weighted averages and proportional attention (log size added to the logits);
    training-free. Needs a timm ViT with global_pool 'token'."""
    from timm.layers import Attention
    from timm.models.vision_transformer import Block

    from vitcompress.layers.token_merge import ToMeBlock, ToMeBlocks

    blocks = check_architecture(model)
    targets = select_modules(model, config.targets, config.ignore, (Block,), STEP)
    positions = {f"blocks.{i}": i for i in range(len(blocks))}
    outside = [name for name, _ in targets if name not in positions]
    if outside:
        raise TargetError(f"{STEP}: {outside[0]} is not a block of model.blocks (targets must be blocks.N)")
    r = _per_block_r(config, [name for name, _ in targets])
    merging: dict[str, int] = {}
    for i in range(min(positions[name] for name in r), len(blocks)):
        name, block = f"blocks.{i}", blocks[i]
        if name not in r and not hasattr(block, "attn"):
            continue  # e.g. a block whose attention was skipped: nothing to weigh by size
        attn = block.attn
        if not isinstance(block, Block) or type(attn) is not Attention or getattr(attn, "gate", None) is not None:
            why = "" if name in r else " (it follows a merging block, and merged tokens need proportional attention)"
            raise TargetError(f"{STEP}: {name} is a {type(block).__name__} with {type(attn).__name__}; ToMe needs a "
                              f"timm Block with timm's ungated softmax Attention{why}")
        merging[name] = r.get(name, 0)
    for name, block_r in merging.items():
        blocks[positions[name]] = ToMeBlock.from_block(blocks[positions[name]], block_r)
    model.blocks = ToMeBlocks(*blocks)
    followers = [name for name in merging if name not in r]
    log.info("%s: r = %s; proportional attention only in %s", STEP, r, followers or "no other block")
    inputs.details.update(r=r, proportional_attention_only=followers)
    return list(r)
