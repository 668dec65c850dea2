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
import torch.distributed

from telltale_norm.norms import token_norms

# Runs the layer again on (hidden, residual) of the whole (padded) step, without writing the
# KV cache, and returns its new (hidden, residual). Must not modify its arguments.
Rerun = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# Makes every tensor-parallel rank take the same per-token decisions: returns the union of a
# bool `[tokens]` mask over the ranks (identity on one rank).
Agree = Callable[[torch.Tensor], torch.Tensor]


def _alone(mask: torch.Tensor) -> torch.Tensor:
    return mask


def union_over(group: torch.distributed.ProcessGroup) -> Agree:
    """The `Agree` of a tensor-parallel group: a token is active on every rank when it is
    on one (a rank whose norms differ in the last bit must not re-run alone, since the
    layer's own all-reduce would wait for the others)."""
    def agree(mask: torch.Tensor) -> torch.Tensor:
        flags = mask.to(torch.uint8)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX, group=group)
        return flags.bool()

    return agree


@dataclass
class LoopResult:
    """Outcome of one layer's ALRR step: the new state, and per token (all `[tokens]`)..."""

    hidden: torch.Tensor
    residual: torch.Tensor
    runs: torch.Tensor  # int: extra passes the token ran in while active
    taken: torch.Tensor  # int: extra passes whose output the token kept
    entered: torch.Tensor  # bool: the token was in the window after the first pass
    stopped_tau: torch.Tensor  # bool: a re-run fell to or below tau
    stopped_growth: torch.Tensor  # bool: a re-run grew less than GROWTH_EPS
    stopped_blowup: torch.Tensor  # bool: a re-run reached BLOWUP * tau
    layer_passes: int  # extra executions of the layer for the whole step


def loop_step(hidden: torch.Tensor, residual: torch.Tensor, norms: torch.Tensor,
              tau: torch.Tensor, eligible: torch.Tensor, max_extra: torch.Tensor,
              growth_eps: torch.Tensor, blowup: torch.Tensor, alpha: torch.Tensor,
              rerun: Rerun, limit: int, agree: Agree = _alone) -> LoopResult:
    """ALRR on one layer's output (the step's every row; `hidden`/`residual` untouched).

    `eligible` marks decode tokens of loop requests whose tau may be acted on; `limit` is
    the largest `max_extra` among them (known on the host). Stops early when no token is
    active: that is one host synchronisation per pass (`bool(active.any())`), the price of
    skipping idle re-runs. Every decision goes through `agree`, so tensor-parallel ranks
    whose norms differ in the last bit still re-run (a collective inside the layer)
    together and keep the same tokens.
    """
    active = agree(eligible & (norms > tau) & (norms < blowup * tau))
    zeros = torch.zeros_like(norms, dtype=torch.int64)
    no = torch.zeros_like(active)
    result = LoopResult(hidden, residual, runs=zeros, taken=zeros.clone(), entered=active,
                        stopped_tau=no, stopped_growth=no.clone(), stopped_blowup=no.clone(),
                        layer_passes=0)
    a = alpha.unsqueeze(-1).to(hidden.dtype)
    n_prev = norms
    for extra in range(limit):
        active = active & (extra < max_extra)
        if not bool(active.any()):
            break
        # The layer may overwrite its inputs (vLLM's fused add+RMSNorm is in place on GPU):
        # hand it copies, never the state it is compared with.
        h_new, r_new = rerun(result.hidden.clone(), result.residual.clone())
        result.layer_passes += 1
        result.runs += active.long()
        n_new = token_norms(h_new, r_new)
        growth = (n_new - n_prev) / (n_prev + 1e-6)
        above, grew, bounded = n_new > tau, growth >= growth_eps, n_new < blowup * tau
        result.stopped_blowup |= active & ~bounded
        result.stopped_tau |= active & bounded & ~above
        result.stopped_growth |= active & bounded & above & ~grew
        active = agree(active & above & grew & bounded)
        result.taken += active.long()
        take = active.unsqueeze(-1)
        result.hidden = torch.where(take, (1 - a) * result.hidden + a * h_new, result.hidden)
        result.residual = torch.where(take, (1 - a) * result.residual + a * r_new,
                                      result.residual)
        n_prev = torch.where(active, n_new, n_prev)
    return result
