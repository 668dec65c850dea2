"""loop: ALRR, Adaptive Layer-wise Reasoning Recursion (SPEC.md "loop").

A decode token whose norm after a layer lies in the window `(tau, BLOWUP * tau)` runs the
same layer again on its own output. It keeps going while its norm stays above tau, grows by
at least GROWTH_EPS relative to the previous pass, and stays below BLOWUP * tau, for at most
MAX_EXTRA extra passes; each accepted pass is damped by ALPHA.

A layer can only be re-run for the whole step (attention metadata describes every token of
the step), so each pass runs all tokens and only the active ones take the result.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed

from telltale_norm.batch import REPLAY, StepBuffers
from telltale_norm.norms import token_norms
from telltale_norm.requests import COL
from telltale_norm.traces import ACTION_RERUN

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


# Per-layer counters of loop, written by its Python only (never inside a compiled graph,
# whose writes to shared state could land after them).
LOOP_COUNTERS = (
    "reruns",  # token re-runs (a token in 2 extra passes counts 2)
    "rerun_tokens",  # tokens that entered a re-run
    "rerun_taken",  # re-run outputs kept (passed every stopping rule)
    "rerun_stopped_tau", "rerun_stopped_growth", "rerun_stopped_blowup",  # why they stopped
    "rerun_layer_passes",  # extra executions of the layer (each runs the whole step)
)


class LoopLayer:
    """Loop's part of a layer, after the graph-safe step (`layer.LayerStep`): reads the
    step's `gate` (norms, tau where a token enters loop's window, how many do) and re-runs
    the layer in place."""

    def __init__(self, step: StepBuffers, counters: torch.Tensor, action: torch.Tensor,
                 column: dict[int, int], agree: Agree | None) -> None:
        self.step = step  # the step's tokens: their parameters and flags
        self.counters = counters  # [len(LOOP_COUNTERS), layers]
        self.action = action  # [tokens, patched layers]: ACTION_RERUN where a re-run was kept
        self.column = column
        self.agree = agree or _alone  # None: one rank
        self.limit = 0  # the step's largest LOOP_MAX_EXTRA (host, set per step)

    def __call__(self, layer: int, hidden: torch.Tensor, residual: torch.Tensor,
                 gate: torch.Tensor, rerun: Rerun) -> None:
        """Re-run `layer` for its active tokens, editing `hidden`/`residual` in place."""
        if not self.limit:  # no loop request in this step: no synchronisation either
            return
        # the common case, no token enters: one number read (one synchronisation; alone,
        # without a mask op: ~2 us less per layer on the CPU)
        if not len(gate) or not (float(gate[0, 2]) > 0 if self.agree is _alone
                                 else bool(self.agree(gate[:1, 2] > 0))):
            return
        norms, tau = gate[:, 0], gate[:, 1]
        enters = self.agree(~torch.isnan(tau))
        t = hidden.shape[0]
        params = self.step.params[:t]
        result = loop_step(
            hidden, residual, norms, torch.nan_to_num(tau, nan=math.inf), enters,
            max_extra=params[:, COL["loop_max_extra"]].long(),
            growth_eps=params[:, COL["loop_growth_eps"]],
            blowup=params[:, COL["loop_blowup"]], alpha=params[:, COL["loop_alpha"]],
            rerun=rerun, limit=self.limit, agree=self.agree)
        if not result.layer_passes:
            return
        hidden.copy_(result.hidden)
        residual.copy_(result.residual)
        # replayed tokens were counted when they were decoded
        new = (self.step.flags[:t] & REPLAY) == 0
        count = self.counters[:, layer]
        for i, values in enumerate((result.runs, result.entered, result.taken,
                                    result.stopped_tau, result.stopped_growth,
                                    result.stopped_blowup)):
            count[i] += (values * new).sum()
        count[len(LOOP_COUNTERS) - 1] += result.layer_passes
        if layer in self.column:
            self.action[:t, self.column[layer]] = (result.taken > 0).float() * ACTION_RERUN
