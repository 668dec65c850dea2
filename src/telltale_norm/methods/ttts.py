"""ttts: ERSS, Endogenous Reasoning State Steering (SPEC.md "ttts").

Per request and layer, a bank keeps the BANK_K highest-norm states seen (n > tau). After a
streak of LOW_K low-norm tokens (n < GAMMA * tau), outside a cooldown and with probability
P_INJECT, the bank state most similar to the current one (cosine >= COS_MIN) is injected:
`hidden += BETA * (v - residual)`; then the streak restarts and a cooldown of COOLDOWN
tokens begins.

`ttts_step` processes one decode token per request for a whole step at once: rows are
requests, every rule is a tensor operation, and the new state is returned, not mutated. It
is graph-safe: no host synchronisation and no shape that depends on data, so it can run
inside a compiled graph or a CUDA graph (every row is searched; rows that do not trigger
take no injection, and may search any bank: `BankState.bank`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from telltale_norm.requests import COL


@dataclass(frozen=True)
class BankState:
    """Per (request, layer) state, one row per request: banks `[R, K, H]`, norms `[R, K]`
    (-inf marks an empty entry), low streaks and cooldowns `[R]`.

    `bank` may also be a function of the step's trigger mask `[R]` that returns the banks:
    the search only needs the banks of rows that trigger, and may be given any bank for the
    others (a traced step searches every row; the per-layer step gives those rows one shared
    bank, kept in cache, instead of reading each row's from memory)."""

    bank: torch.Tensor | Callable[[torch.Tensor], torch.Tensor]
    bank_norm: torch.Tensor
    low_streak: torch.Tensor
    cooldown: torch.Tensor


@dataclass(frozen=True)
class TttsSettings:
    """Per-request hyperparameters, one row per request (`[R]` each)."""

    low_k: torch.Tensor
    gamma: torch.Tensor
    p_inject: torch.Tensor
    beta: torch.Tensor
    cooldown: torch.Tensor
    bank_k: torch.Tensor
    cos_min: torch.Tensor

    @classmethod
    def from_params(cls, params: torch.Tensor) -> TttsSettings:
        """The settings of the requests whose parameter rows (`requests.PARAM_COLUMNS`) are
        `params` `[R, columns]`."""
        return cls(**{name: params[:, COL[f"ttts_{name}"]] for name in _SETTINGS})


_SETTINGS = tuple(f.name for f in dataclasses.fields(TttsSettings))  # a constant when traced


@dataclass(frozen=True)
class TttsOutcome:
    """What one step changes. The bank itself only changes where `inserted_at >= 0` (x is
    written there), so it is not copied: `next_state` builds the full new state."""

    bank_norm: torch.Tensor  # [R, K]
    low_streak: torch.Tensor  # [R]
    cooldown: torch.Tensor  # [R]
    inserted_at: torch.Tensor  # [R] bank entry that took x, or -1
    delta: torch.Tensor  # [R, H] to add to x (zero rows where nothing is injected)
    injected: torch.Tensor  # [R] bool
    no_match: torch.Tensor  # [R] bool: triggered, but no bank state reached COS_MIN

    def next_state(self, before: BankState, x: torch.Tensor) -> BankState:
        """The state after this step, given the one before and the step's states `x`."""
        rows = torch.arange(len(x), device=x.device)
        put = self.inserted_at >= 0
        bank = before.bank.float().clone()
        at = torch.where(put, self.inserted_at, 0)
        bank[rows, at] = torch.where(put.unsqueeze(1), x, bank[rows, at])
        return BankState(bank, self.bank_norm, self.low_streak, self.cooldown)


@dataclass(frozen=True)
class BankInsert:
    """Where a step's states enter the banks: an entry is replaced by x when x's norm is
    above tau and above the lowest norm in the bank (empty entries are -inf)."""

    bank_norm: torch.Tensor  # [R, K] after the insert
    in_use: torch.Tensor  # [R, K] bool: the entries within the request's BANK_K
    hit: torch.Tensor  # [R, K] bool: the entry that takes x
    at: torch.Tensor  # [R] that entry, or -1


def bank_insert(norms: torch.Tensor, tau: torch.Tensor, eligible: torch.Tensor,
                bank_norm: torch.Tensor, bank_k: torch.Tensor) -> BankInsert:
    """The insert of one step (`norms`, `tau`, `eligible`, `bank_k`: `[R]`; `bank_norm`
    `[R, K]`): the lowest-norm entry in use is replaced if x's norm is higher."""
    entries = torch.arange(bank_norm.shape[1], device=norms.device)
    in_use = entries < bank_k.unsqueeze(1)  # [R, K]
    lowest, where = bank_norm.masked_fill(~in_use, torch.inf).min(dim=1)
    insert = eligible & (norms > tau) & (norms > lowest)
    hit = insert.unsqueeze(1) & (entries == where.unsqueeze(1))
    return BankInsert(torch.where(hit, norms.unsqueeze(1), bank_norm), in_use, hit,
                      torch.where(insert, where, -1))


def ttts_step(x: torch.Tensor, residual: torch.Tensor, norms: torch.Tensor,
              tau: torch.Tensor, eligible: torch.Tensor, draws: torch.Tensor,
              state: BankState, s: TttsSettings, insert: BankInsert | None = None
              ) -> TttsOutcome:
    """One step of ERSS for R requests (`x`, `residual`: `[R, H]` float32; rest `[R]`).

    Rows that are not `eligible` keep their state and get no injection. `norms` are the
    norms of `x`. Every rule is one or two tensor operations over all rows.

    The entry an insert takes is never read (x stands for it), so `state.bank` may be the
    bank before or after this step's `insert` (`bank_insert`, computed here when not given):
    the per-layer step writes x first, so that a compiled step reads the bank where it lies.
    """
    if insert is None:
        insert = bank_insert(norms, tau, eligible, state.bank_norm, s.bank_k)
    n = norms.unsqueeze(1)  # [R, 1]

    low_streak = torch.where(norms < s.gamma * tau, state.low_streak + 1, 0)
    cooldown = (state.cooldown - 1).clamp_min(0)
    trigger = eligible & (low_streak >= s.low_k) & (cooldown == 0) & (draws < s.p_inject)

    usable = insert.in_use & torch.isfinite(insert.bank_norm)
    bank = state.bank(trigger) if callable(state.bank) else state.bank
    best_cos, chosen = _nearest(x, n, bank, insert.bank_norm, usable, insert.hit)
    injected = trigger & (best_cos >= s.cos_min)
    delta = torch.where(injected.unsqueeze(1), s.beta.unsqueeze(1) * (chosen - residual), 0.0)
    low_streak = torch.where(injected, 0, low_streak)
    cooldown = torch.where(injected, s.cooldown.to(cooldown.dtype), cooldown)
    return TttsOutcome(
        bank_norm=insert.bank_norm,
        low_streak=torch.where(eligible, low_streak, state.low_streak),
        cooldown=torch.where(eligible, cooldown, state.cooldown),
        inserted_at=insert.at,
        delta=delta, injected=injected, no_match=trigger & ~injected)


def _nearest(x: torch.Tensor, n: torch.Tensor, bank: torch.Tensor, bank_norm: torch.Tensor,
             usable: torch.Tensor, hit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the highest cosine between `x` and a usable entry of its bank after this
    step's insert (`hit`: the entry that became x), and that entry (of the highest norm
    among equals). An entry's norm is its bank norm, the norm of the state when it was
    banked."""
    # a product and a sum, not a batched matmul: traced, the compiler then reads the bank
    # where it lies instead of first gathering every row's bank into a copy
    dots = (bank * x.unsqueeze(1)).sum(2)  # [R, K]
    dots = torch.where(hit, n.square(), dots)
    cos = (dots / (bank_norm * n).clamp_min(1e-8)).masked_fill(~usable, -torch.inf)
    best_cos = cos.amax(dim=1)
    # ties (parallel states) go to the entry of highest norm
    best = torch.where(cos == best_cos.unsqueeze(1), bank_norm, -torch.inf).argmax(dim=1)
    chosen = bank[torch.arange(len(x), device=x.device), best].float()
    return best_cos, torch.where(hit.gather(1, best.unsqueeze(1)), x, chosen)
