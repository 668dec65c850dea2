"""suppress: the ablation. Shrink the residual stream of chosen tokens (SPEC.md "suppress").

Both actions are a per-token scaling of `x`: `mul` multiplies by a constant, `clamp` rescales
so that `||x|| <= tau / clamp_div` and never enlarges. Tokens are chosen by norm
(`high_norm`: `n > tau`) or by a seeded draw (`random`).
"""

from __future__ import annotations

import torch

from telltale_norm.norms import scale_residual_stream
from telltale_norm.requests import COL


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


def suppress_layer(hidden: torch.Tensor, residual: torch.Tensor | None, norms: torch.Tensor,
                   tau: torch.Tensor, params: torch.Tensor, eligible: torch.Tensor,
                   output: torch.Tensor, draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's suppress for a step's tokens: `params` are their requests' parameter rows
    (`requests.PARAM_COLUMNS`), `eligible` the tokens of suppress requests whose tau may be
    acted on, `output` their output tokens (prompt tokens are touched only where
    VLLM_SUPPRESS_ONLY_DECODE is 0), `draws` their uniform draws. Returns the new hidden
    and the chosen tokens."""
    factor, chosen = suppress_factors(
        norms, tau, eligible & (output | (params[:, COL["suppress_only_decode"]] <= 0)),
        random_mode=params[:, COL["suppress_random"]] > 0, draws=draws,
        p=params[:, COL["suppress_p"]],
        clamp_action=params[:, COL["suppress_clamp"]] > 0,
        mul_scale=params[:, COL["suppress_mul_scale"]],
        clamp_div=params[:, COL["suppress_clamp_div"]])
    return scale_residual_stream(hidden, residual, factor, chosen), chosen
