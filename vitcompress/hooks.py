"""Run calibration batches through a model with forward hooks attached (activation statistics, routing
counts, CKA), removing the hooks afterwards even when a forward fails."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


def run_with_hooks(model: nn.Module, batches: Iterable[torch.Tensor], handles: list[RemovableHandle]) -> None:
    """Forward every batch without gradients, then remove ``handles``."""
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch)
    finally:
        for handle in handles:
            handle.remove()
