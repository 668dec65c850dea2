"""suppress: the ablation. Shrink the residual stream of chosen tokens (SPEC.md "suppress").

Both actions are a per-token scaling of `x`: `mul` multiplies by a constant, `clamp` rescales
so that `||x|| <= tau / clamp_div` and never enlarges. Tokens are chosen by norm
(`high_norm`: `n > tau`) or by a seeded draw (`random`).
"""

from __future__ import annotations

import torch


def suppress_factors(
    norms: torch.Tensor,
    tau: torch.Tensor,
    eligible: torch.Tensor,
    random_mode: torch.Tensor,
    draws: torch.Tensor,
    p: torch.Tensor,
    clamp_action: torch.Tensor,
    mul_scale: torch.Tensor,
    clamp_div: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token scale factors for `x` (1 = untouched) and the mask of chosen tokens.

    All arguments are `[tokens]` tensors: the norms, tau, which tokens may be touched, and
    each token's settings (random mode, its uniform draw and probability, clamp action,
    `mul` scale, clamp divisor).
    """
    chosen = eligible & torch.where(random_mode, draws < p, norms > tau)
    limit = tau / clamp_div
    clamp = torch.where(norms > limit, limit / norms.clamp_min(1e-12), torch.ones_like(norms))
    factor = torch.where(clamp_action, clamp, mul_scale)
    return torch.where(chosen, factor, torch.ones_like(factor)), chosen
