"""SkippedBlock: a transformer block whose attention branch is removed; the MLP branch stays.

PIVOT (Moitra et al., "PIVOT: Input-aware Path Selection for Energy-efficient ViT Inference", DAC 2024)
skips the whole multi-head self-attention branch of chosen blocks. A pre-norm timm ``Block`` computes::

    x = x + drop_path1(ls1(attn(norm1(x))))      # attention branch
    x = x + drop_path2(ls2(mlp(norm2(x))))       # MLP branch

and a skipped block keeps only the second line: the attention branch becomes the identity on the residual
stream. ``norm1``, ``attn`` and ``ls1`` are not kept as submodules, so none of their weights is saved and
none of their ops reaches the exported ONNX graph.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class SkippedBlock(nn.Module):
    """``x + drop_path2(ls2(mlp(norm2(x))))``: a block without its attention branch.

    Built from a timm ``Block`` with :meth:`from_block`, sharing (not copying) its MLP-branch modules, whose
    state-dict keys (``norm2``, ``mlp``, ``ls2``) stay those of the original block.
    """

    def __init__(self, norm2: nn.Module, mlp: nn.Module, ls2: Optional[nn.Module] = None,
                 drop_path2: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.norm2 = norm2
        self.mlp = mlp
        self.ls2 = ls2 if ls2 is not None else nn.Identity()
        self.drop_path2 = drop_path2 if drop_path2 is not None else nn.Identity()

    @classmethod
    def from_block(cls, block: nn.Module) -> "SkippedBlock":
        """Keep the MLP branch of a timm ``Block`` (``norm2``, ``mlp``, ``ls2``, ``drop_path2``)."""
        missing = [n for n in ("norm2", "mlp") if not hasattr(block, n)]
        if missing or not hasattr(block, "attn"):
            raise TypeError(f"{type(block).__name__} is not a pre-norm transformer block with attn / norm2 / mlp")
        return cls(block.norm2, block.mlp, getattr(block, "ls2", None), getattr(block, "drop_path2", None))

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
