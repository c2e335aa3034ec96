"""LowRankLinear: a Linear ``W`` (out×in) factored as ``W ≈ A·B`` with ``A`` out×r and ``B`` r×in.

Three factorisations, all computed in float64:

* plain truncated SVD, ``W = UΣVᵀ`` → ``A = U_r Σ_r^½``, ``B = Σ_r^½ V_rᵀ``; by Eckart–Young the Frobenius
  error is exactly the norm of the discarded singular values;
* ``pca``: project the input onto the top-r principal directions ``P_r`` of the layer's input activations,
  ``B = P_rᵀ``, ``A = W P_r`` (keeps the part of ``W`` that the data actually excites);
* ``cholesky`` (SVD-LLM, Wang et al. 2024): with ``XᵀX = LLᵀ``, take the SVD of ``W L`` and undo ``L``:
  ``A = U_r Σ_r^½``, ``B = Σ_r^½ V_rᵀ L⁻¹``. This minimises the output error ``‖X Wᵀ − X (AB)ᵀ‖_F`` on
  the calibration activations.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

Whitening = Literal["none", "pca", "cholesky"]


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one intra-op thread inside, as before outside: the factorisations (SVD, Cholesky, inverse,
    eigendecomposition) of a layer's matrices. As fast as two threads on an idle 2-core CPU (384×1536 float64 SVD:
    0.148 s vs 0.151 s), and on a busy one the two threads of LAPACK wait for each other (12 SVDs of DeiT-S MLP
    matrices: 0.9–2.5 s on one thread, 13.6–17.2 s on two, measured 2026-12-07, AMD EPYC, under another process)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class LowRankLinear(nn.Module):
    """``y = second(first(x))``: ``first`` maps in→rank without bias, ``second`` maps rank→out with the bias.

    The factors run on the tokens flattened to one (tokens × features) matrix: the same products, but the ONNX
    export is a 2-D ``Gemm`` with its bias instead of a batched ``MatMul`` and a separate ``Add`` (DeiT-S with
    every block Linear at rank 1/8, onnxruntime, 2 threads: batch-8 p50 −6 %, measured 2026-12-04, AMD EPYC).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = nn.Linear(in_features, rank, bias=False)
        self.second = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x.reshape(-1, self.in_features))).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"

    @staticmethod
    def component_energy(linear: nn.Linear, whitening: Whitening = "none", gram: torch.Tensor | None = None) -> torch.Tensor:
        """Energy of each rank-1 component, in the order they are kept (for ``energy`` rank selection).

        σ² of ``W`` (plain), σ² of ``W L`` (cholesky: output energy on the calibration data), or the
        eigenvalues of ``XᵀX`` (pca: input variance kept).
        """
        if whitening == "pca":
            if gram is None:
                raise ValueError("whitening 'pca' needs the Gram matrix of the layer's inputs")
            with one_thread():
                return torch.linalg.eigvalsh(gram.double()).flip(-1).clamp_min(0)
        with one_thread():
            return torch.linalg.svdvals(_target_matrix(linear, whitening, gram)[0]) ** 2

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, rank: int, whitening: Whitening = "none", gram: torch.Tensor | None = None
    ) -> "LowRankLinear":
        """Factor ``linear`` at ``rank``; ``gram`` is ``XᵀX`` of its inputs (in×in), required when whitened."""
        out_features, in_features = linear.weight.shape
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"rank {rank} outside 1..{min(in_features, out_features)}")
        with one_thread():
            matrix, undo = _target_matrix(linear, whitening, gram)
            if whitening == "pca":
                first, second = undo[:, :rank].T, matrix[:, :rank]
            else:
                u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
                root = s[:rank].sqrt()
                second = u[:, :rank] * root
                first = root[:, None] * vh[:rank]
                if undo is not None:
                    first = first @ undo
        layer = cls(in_features, out_features, rank, bias=linear.bias is not None)
        dtype = linear.weight.dtype
        with torch.no_grad():
            layer.first.weight.copy_(first.to(dtype))
            layer.second.weight.copy_(second.to(dtype))
            if linear.bias is not None:
                layer.second.bias.copy_(linear.bias)
        return layer.to(linear.weight.device)


def _target_matrix(
    linear: nn.Linear, whitening: Whitening, gram: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The float64 matrix to factor and the map that undoes the whitening (None for plain SVD).

    For ``pca`` the "matrix" is ``W P`` with the eigenvectors ``P`` sorted by decreasing variance, and the
    undo map is ``P`` itself; its column norms play the role of singular values.
    """
    weight = linear.weight.detach().double()
    if whitening == "none":
        return weight, None
    if gram is None:
        raise ValueError(f"whitening {whitening!r} needs the Gram matrix of the layer's inputs")
    gram = gram.double()
    if whitening == "pca":
        _, vectors = torch.linalg.eigh(gram)
        vectors = vectors.flip(-1)
        return weight @ vectors, vectors
    jitter = 1e-6 * gram.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    chol = torch.linalg.cholesky(gram + jitter * eye)
    return weight @ chol, torch.linalg.inv(chol)
