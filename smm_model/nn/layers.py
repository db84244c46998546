"""Shared building blocks: the SNN gene encoder, gated attention pooling, split heads, masked mean."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["SNN", "GatedAttentionPool", "SplitHead", "masked_mean"]


class SNN(nn.Module):
    """Self-normalising gene encoder (the reference's MaxNet).

    Linear-ELU-AlphaDropout blocks, then a ReLU, so the gene embedding is non-negative like the
    reference's. Weights are drawn from N(0, 1/fan_in) (the SELU/SNN initialisation the reference
    uses); biases start at zero.
    """

    def __init__(self, in_dim: int, hidden: tuple[int, ...], out_dim: int, dropout: float) -> None:
        super().__init__()
        widths = (in_dim, *hidden, out_dim)
        blocks: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            lin = nn.Linear(a, b)
            nn.init.normal_(lin.weight, std=1.0 / math.sqrt(a))
            nn.init.zeros_(lin.bias)
            blocks += [lin, nn.ELU(), nn.AlphaDropout(dropout)]
        self.net = nn.Sequential(*blocks, nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:  # (B, in_dim) -> (B, out_dim)
        return self.net(x)


def masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over dim 1 of (B, T, C) counting only tokens where ``mask`` (B, T) is True."""
    if mask is None:
        return x.mean(dim=1)
    m = mask.to(x.dtype).unsqueeze(-1)  # (B, T, 1)
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


class GatedAttentionPool(nn.Module):
    """Gated attention MIL pooling (Ilse et al. 2018), the ABMIL baselines' aggregator."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Dropout(dropout))
        self.b = nn.Sequential(nn.Linear(dim, hidden), nn.Sigmoid(), nn.Dropout(dropout))
        self.score = nn.Linear(hidden, 1)

    def forward(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """(B, N, C), (B, N) -> pooled (B, C) and attention weights (B, N); padding gets 0 weight."""
        if mask is not None:
            x = x.masked_fill(~mask.unsqueeze(-1), 0.0)  # padding never enters the sum, even if non-finite
        s = self.score(self.a(x) * self.b(x)).squeeze(-1)  # (B, N)
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        w = torch.softmax(s, dim=1)  # (B, N)
        return torch.einsum("bn,bnc->bc", w, x), w


class SplitHead(nn.Linear):
    """A task head over the concatenation [tumour | microenvironment] (B, 2H) -> (B, C).

    A plain Linear whose input halves are known, so gradient coordination can compare the two
    halves of each class row of its weight.
    """

    def __init__(self, half: int, out_dim: int) -> None:
        super().__init__(2 * half, out_dim)
        self.half = half
