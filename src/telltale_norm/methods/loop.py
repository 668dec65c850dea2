"""loop: ALRR, Adaptive Layer-wise Reasoning Recursion (SPEC.md "loop").

A decode token whose norm after a layer lies in the window `(tau, BLOWUP * tau)` runs the
same layer again on its own output. It keeps going while its norm stays above tau, grows by
at least GROWTH_EPS relative to the previous pass, and stays below BLOWUP * tau, for at most
MAX_EXTRA extra passes; each accepted pass is damped by ALPHA.

A layer can only be re-run for the whole step (attention metadata describes every token of
the step), so each pass runs all tokens and only the active ones take the result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from telltale_norm.norms import token_norms

# Runs the layer again on (hidden, residual) of the whole (padded) step, without writing the
# KV cache, and returns its new (hidden, residual). Must not modify its arguments.
Rerun = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class LoopResult:
    """Per-token outcome of one layer's ALRR step (all `[tokens]`)."""

    runs: torch.Tensor  # int: extra passes the token ran in while active
    taken: torch.Tensor  # int: extra passes whose output the token kept
    entered: torch.Tensor  # bool: the token was in the window after the first pass
    stopped_tau: torch.Tensor  # bool: a re-run fell to or below tau
    stopped_growth: torch.Tensor  # bool: a re-run grew less than GROWTH_EPS
    stopped_blowup: torch.Tensor  # bool: a re-run reached BLOWUP * tau
    layer_passes: int  # extra executions of the layer for the whole step


def loop_step(hidden: torch.Tensor, residual: torch.Tensor, num_tokens: int,
              norms: torch.Tensor, tau: torch.Tensor, eligible: torch.Tensor,
              max_extra: torch.Tensor, growth_eps: torch.Tensor, blowup: torch.Tensor,
              alpha: torch.Tensor, rerun: Rerun) -> LoopResult:
    """Apply ALRR to one layer's output in place.

    `hidden`/`residual` are the layer's full (possibly padded) outputs; the per-token tensors
    cover their first `num_tokens` rows. `eligible` marks decode tokens of loop requests
    whose tau may be acted on. Stops early when no token is active: that is one host
    synchronisation per pass (`bool(active.any())`), the price of skipping idle re-runs.
    """
    t = num_tokens
    active = eligible & (norms > tau) & (norms < blowup * tau)
    zeros = torch.zeros_like(norms, dtype=torch.int64)
    result = LoopResult(runs=zeros, taken=zeros.clone(), entered=active,
                        stopped_tau=torch.zeros_like(active),
                        stopped_growth=torch.zeros_like(active),
                        stopped_blowup=torch.zeros_like(active), layer_passes=0)
    limit = int(max_extra.max()) if t else 0
    h_cur, r_cur = hidden, residual
    n_prev = norms
    for extra in range(limit):
        active = active & (extra < max_extra)
        if not bool(active.any()):
            break
        # The layer may overwrite its inputs (vLLM's fused add+RMSNorm is in place on GPU):
        # hand it copies, never the first pass's output.
        h_new, r_new = rerun(h_cur.clone(), r_cur.clone())
        result.layer_passes += 1
        result.runs += active.long()
        n_new = token_norms(h_new[:t], r_new[:t])
        growth = (n_new - n_prev) / (n_prev + 1e-6)
        above, grew, bounded = n_new > tau, growth >= growth_eps, n_new < blowup * tau
        result.stopped_blowup |= active & ~bounded
        result.stopped_tau |= active & bounded & ~above
        result.stopped_growth |= active & bounded & above & ~grew
        active = active & above & grew & bounded
        result.taken += active.long()
        take = _pad(active, h_cur.shape[0]).unsqueeze(-1)
        a = _pad(alpha, h_cur.shape[0]).unsqueeze(-1).to(h_cur.dtype)
        h_cur = torch.where(take, (1 - a) * h_cur + a * h_new, h_cur)
        r_cur = torch.where(take, (1 - a) * r_cur + a * r_new, r_cur)
        n_prev = torch.where(active, n_new, n_prev)
    if result.layer_passes:
        hidden.copy_(h_cur)
        residual.copy_(r_cur)
    return result


def _pad(x: torch.Tensor, length: int) -> torch.Tensor:
    """Extend a per-token tensor to the padded length with zeros/False."""
    if x.shape[0] == length:
        return x
    return torch.cat([x, x.new_zeros(length - x.shape[0])])
