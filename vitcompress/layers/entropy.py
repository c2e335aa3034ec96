"""WithEntropy: a classifier that also returns the Shannon entropy of its softmax, for cascade routing.

PIVOT routes an input to the high-effort model when the low-effort model is unsure, measured by the entropy
H(p) = −Σ_c p_c ln p_c of its softmax (natural log, in nats; PIVOT's code divides by the class count,
which only rescales the threshold). Computing it inside the exported graph makes routing a host-side
comparison with a calibrated threshold.
"""

from __future__ import annotations

import torch
from torch import nn


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of ``softmax(logits)`` over the last axis, from log-probabilities (stable)."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


class WithEntropy(nn.Module):
    """``x → (logits, entropy)`` around a classifier returning logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        return logits, softmax_entropy(logits)
