"""Linear centred kernel alignment (CKA), Kornblith et al., "Similarity of Neural Network Representations
Revisited", ICML 2019.

For feature matrices X (n×p) and Y (n×q) whose rows are the same n samples, with H = I − 11ᵀ/n::

    CKA(X, Y) = ‖YᵀHX‖²_F / (‖XᵀHX‖_F · ‖YᵀHY‖_F)

It lies in [0, 1], is 1 for identical inputs and does not change under an orthogonal transform or an
isotropic scaling of either input. All three terms are centred cross-covariances, so they can be summed
over batches (:class:`CKAStats`) without keeping the n rows: n = tokens × images is large, p and q are the
model width.
"""

from __future__ import annotations

import torch


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two (n, features) matrices (computed in float64)."""
    stats = CKAStats()
    stats.update(x, y)
    return stats.value()


class CKAStats:
    """Running sums (float64) from which linear CKA of all rows seen so far is computed exactly."""

    def __init__(self) -> None:
        self.n = 0
        self.sx = self.sy = self.xx = self.yy = self.yx = None

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add rows: ``x`` (…, p) and ``y`` (…, q) with the same leading shape (e.g. batch × tokens)."""
        if x.shape[:-1] != y.shape[:-1]:
            raise ValueError(f"x and y must have the same rows, got {tuple(x.shape)} and {tuple(y.shape)}")
        x = x.detach().reshape(-1, x.shape[-1]).double()
        y = y.detach().reshape(-1, y.shape[-1]).double()
        sums = (x.sum(0), y.sum(0), x.T @ x, y.T @ y, y.T @ x)
        if self.n == 0:
            self.sx, self.sy, self.xx, self.yy, self.yx = sums
        else:
            self.sx, self.sy, self.xx, self.yy, self.yx = (a + b for a, b in zip(
                (self.sx, self.sy, self.xx, self.yy, self.yx), sums))
        self.n += x.shape[0]

    def value(self) -> float:
        """CKA of the rows added so far; 0 when either input is constant (no variance to align)."""
        if self.n == 0:
            raise ValueError("no rows added")
        cxx = self.xx - torch.outer(self.sx, self.sx) / self.n
        cyy = self.yy - torch.outer(self.sy, self.sy) / self.n
        cyx = self.yx - torch.outer(self.sy, self.sx) / self.n
        denominator = torch.linalg.matrix_norm(cxx) * torch.linalg.matrix_norm(cyy)
        if denominator <= 0:
            return 0.0
        return float(torch.linalg.matrix_norm(cyx) ** 2 / denominator)
