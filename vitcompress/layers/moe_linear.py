"""MoELinear: a token-level mixture of two experts built from one Linear, {dense, shift} (ShiftAddViT).

ShiftAddViT (You et al., NeurIPS 2023) reparameterises a pretrained Linear as two experts from the same
weight, the original dense ``W`` and its power-of-two form ``W_pot`` (:class:`ShiftLinear`), and routes each
token to one of them with a router ``Linear(C, 2)``:

* ``p = softmax(h + ε)``, ``h`` the router logits, ``ε ~ N(0, noise_std²)`` in training only;
* top-1 routing; the chosen expert's output is scaled by ``p_e / stopgrad(p_e)``: its value is 1, so the
  pretrained scale is kept (a fresh router gives p ≈ ½, which would halve every MLP), while its gradient is
  that of the probability-scaled output (``∂/∂h = g·y·∂p_e/∂h / p_e``). The released code's router uses a
  constant gate, so it never receives a gradient; this one does.

Latency-aware load balance (the released code computes it but switches it off): with ``α_e`` each expert's
latency share, ``Imp_e = α_e Σ_x p_e(x)`` and ``Load_e = α_e Σ_x P[x → e]``, where for two experts with
Gaussian logit noise ``P[x → 0] = Φ((h_0 − h_1) / (σ√2))`` (Shazeer et al. 2017's smooth load), and
``L = CV²(Imp) + CV²(Load)`` with ``CV²(z) = Var(z) / mean(z)²``. It is 0 when ``α_0 n_0 = α_1 n_1``: token
counts inversely proportional to latency, the faster expert takes more tokens. In training the layer stores
``weight · L`` as ``aux_loss`` for the fine-tune to add.

Deploy (static graphs that plain onnxruntime runs): ``dispatch="where"`` runs both experts on every token
and picks with ``Where``; ``dispatch="gather"`` gathers each expert's tokens (``NonZero``/``Gather``), runs
the expert on them only and scatters the results back (``ScatterND``). ``dispatch="auto"`` computes the
gather form in torch and leaves the choice to the export, which measures both forms in onnxruntime
(:mod:`vitcompress.moe_dispatch`): which one is faster depends on the machine, the layer sizes and
how the trained router splits the tokens.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from vitcompress.hooks import run_with_hooks
from vitcompress.layers.shift_linear import ShiftLinear

Dispatch = Literal["where", "gather", "auto"]
EXPERTS = ("dense", "shift")


def cv_squared(values: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation, ``Var(z) / (mean(z)² + 1e-10)`` (unbiased variance, as the paper)."""
    return values.var() / (values.mean() ** 2 + 1e-10)


def balance_loss(logits: torch.Tensor, alpha: torch.Tensor, noise_std: float) -> torch.Tensor:
    """``CV²(Imp) + CV²(Load)`` of two experts over the tokens of ``logits`` (tokens × 2), clean logits."""
    importance = alpha * logits.softmax(-1).sum(0)
    chosen_first = torch.special.ndtr((logits[:, 0] - logits[:, 1]) / (noise_std * math.sqrt(2)))
    load = alpha * torch.stack([chosen_first.sum(), (1 - chosen_first).sum()])
    return cv_squared(importance) + cv_squared(load)


class MoELinear(nn.Module):
    """Top-1 token routing between ``experts[0]`` (dense Linear) and ``experts[1]`` (shift Linear)."""

    def __init__(self, dense: nn.Module, shift: nn.Module, in_features: int, out_features: int,
                 alpha: tuple[float, float] = (0.5, 0.5), noise_std: float = 0.5, balance_weight: float = 0.01,
                 dispatch: Dispatch = "auto") -> None:
        super().__init__()
        if dispatch not in ("where", "gather", "auto"):
            raise ValueError(f"dispatch must be 'where', 'gather' or 'auto', got {dispatch!r}")
        if len(alpha) != 2 or min(alpha) <= 0:
            raise ValueError(f"alpha must be two positive latency weights, got {alpha}")
        self.in_features, self.out_features = in_features, out_features
        self.experts = nn.ModuleList([dense, shift])
        self.router = nn.Linear(in_features, 2)
        total = float(sum(alpha))
        self.register_buffer("alpha", torch.tensor([a / total for a in alpha]))
        self.noise_std, self.balance_weight, self.dispatch = noise_std, balance_weight, dispatch
        self.force: int | None = None
        self.aux_loss: torch.Tensor | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, levels: int, int8: bool = True, **kwargs) -> "MoELinear":
        """Dense expert = ``linear`` itself, shift expert = its power-of-two form; router weights zero-mean
        small (a fresh router splits tokens about evenly)."""
        shift = ShiftLinear.from_linear(linear, levels, int8)
        layer = cls(linear, shift, linear.in_features, linear.out_features, **kwargs)
        nn.init.normal_(layer.router.weight, std=0.02)
        nn.init.zeros_(layer.router.bias)
        return layer.to(linear.weight.device)

    def route(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router logits (clean) and the chosen expert of each token (noisy logits in training)."""
        logits = self.router(flat)
        if self.force is not None:
            return logits, torch.full_like(logits[:, 0], self.force, dtype=torch.long)
        noisy = logits + torch.randn_like(logits) * self.noise_std if self.training else logits
        return logits, noisy.argmax(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        logits, chosen = self.route(flat)
        out = self._where(flat, chosen) if self.dispatch == "where" else self._gather(flat, chosen)
        self.aux_loss = None
        if self.training:
            gate = logits.softmax(-1).gather(1, chosen[:, None])
            out = out * (gate / gate.detach())
            self.aux_loss = self.balance_weight * balance_loss(logits, self.alpha, self.noise_std)
        return out.reshape(*x.shape[:-1], self.out_features)

    def _where(self, flat: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        return torch.where((chosen == 0)[:, None], self.experts[0](flat), self.experts[1](flat))

    def _gather(self, flat: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        out = flat.new_zeros(flat.shape[0], self.out_features)
        for index, expert in enumerate(self.experts):
            rows = torch.nonzero(chosen == index).squeeze(-1)
            out = out.index_copy(0, rows, expert(flat.index_select(0, rows)))
        return out

    def to_deploy(self) -> "MoELinear":
        """Same routing with constant experts (shift → int8 or float power-of-two Linear), no noise, no loss."""
        experts = [e.to_deploy() if hasattr(e, "to_deploy") else e for e in self.experts]
        deployed = MoELinear(*experts, self.in_features, self.out_features, tuple(self.alpha.tolist()),
                             self.noise_std, self.balance_weight, self.dispatch)
        deployed.router = self.router
        deployed.force = self.force
        return deployed.eval()

    def extra_repr(self) -> str:
        alpha = ", ".join(f"{a:.3f}" for a in self.alpha.tolist())
        return f"experts={EXPERTS}, alpha=({alpha}), dispatch={self.dispatch}, balance_weight={self.balance_weight}"


def expert_shares(model: nn.Module, batches) -> dict | None:
    """Fraction of tokens each expert receives (eval routing) over ``batches``, overall and per layer;
    None when the model has no MoELinear."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, MoELinear)}
    if not layers:
        return None
    counts = {name: torch.zeros(2, dtype=torch.long) for name in layers}
    hooks = []
    for name, layer in layers.items():
        def hook(module, args, name=name):
            _, chosen = module.route(args[0].reshape(-1, module.in_features))
            counts[name] += torch.bincount(chosen, minlength=2)
        hooks.append(layer.register_forward_pre_hook(hook))
    run_with_hooks(model, batches, hooks)
    return {"overall": _shares(sum(counts.values())), "layers": {n: _shares(c) for n, c in counts.items()}}


def _shares(count: torch.Tensor) -> dict[str, float]:
    return {expert: float(count[i]) / max(int(count.sum()), 1) for i, expert in enumerate(EXPERTS)}
