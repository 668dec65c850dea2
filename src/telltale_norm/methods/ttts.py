"""ttts: ERSS, Endogenous Reasoning State Steering (SPEC.md "ttts").

Per request and layer, a bank keeps the BANK_K highest-norm states seen (n > tau). After a
streak of LOW_K low-norm tokens (n < GAMMA * tau), outside a cooldown and with probability
P_INJECT, the bank state most similar to the current one (cosine >= COS_MIN) is injected:
`hidden += BETA * (v - residual)`; then the streak restarts and a cooldown of COOLDOWN
tokens begins.

`ttts_step` processes one decode token per request for a whole step at once: rows are
requests, every rule is a tensor operation, and the new state is returned, not mutated.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from telltale_norm.requests import RequestStates


@dataclass(frozen=True)
class BankState:
    """Per (request, layer) state, one row per request: banks `[R, K, H]`, norms `[R, K]`
    (-inf marks an empty entry), low streaks and cooldowns `[R]`."""

    bank: torch.Tensor
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


@dataclass(frozen=True)
class TttsOutcome:
    """What one step changes. The bank itself only changes where `inserted_at >= 0` (x is
    written there), so it is not copied: `next_state` builds the full new state."""

    bank_norm: torch.Tensor  # [R, K]
    low_streak: torch.Tensor  # [R]
    cooldown: torch.Tensor  # [R]
    inserted_at: torch.Tensor  # [R] bank entry that took x, or -1
    delta: torch.Tensor  # [R, H] to add to hidden (zero rows where nothing is injected)
    injected: torch.Tensor  # [R] bool
    no_match: torch.Tensor  # [R] bool: triggered, but no bank state reached COS_MIN

    def next_state(self, before: BankState, x: torch.Tensor) -> BankState:
        """The state after this step, given the one before and the step's states `x`."""
        bank = before.bank.clone()
        rows = torch.nonzero(self.inserted_at >= 0).squeeze(1)
        bank[rows, self.inserted_at[rows]] = x[rows].to(bank.dtype)
        return BankState(bank, self.bank_norm, self.low_streak, self.cooldown)


@functools.lru_cache(maxsize=8)
def _entries(k: int, device: torch.device) -> torch.Tensor:
    return torch.arange(k, device=device)


def ttts_step(x: torch.Tensor, residual: torch.Tensor, norms: torch.Tensor,
              tau: torch.Tensor, eligible: torch.Tensor, draws: torch.Tensor,
              state: BankState, s: TttsSettings) -> TttsOutcome:
    """One step of ERSS for R requests (`x`, `residual`: `[R, H]` float32; rest `[R]`).

    Rows that are not `eligible` keep their state and get no injection. `norms` are the
    norms of `x`. The bank is read once (dot products) and never copied.
    """
    k = state.bank_norm.shape[1]
    entries = _entries(k, x.device)
    in_use = entries < s.bank_k.unsqueeze(1)  # [R, K]

    # Bank insert: replace the lowest-norm entry (empty ones are -inf) if x is higher.
    lowest, where = torch.where(in_use, state.bank_norm,
                                torch.full_like(state.bank_norm, torch.inf)).min(dim=1)
    insert = eligible & (norms > tau) & (norms > lowest)
    hit = insert.unsqueeze(1) & (entries == where.unsqueeze(1))  # [R, K]
    bank_norm = torch.where(hit, norms.unsqueeze(1), state.bank_norm)

    low_streak = torch.where(norms < s.gamma * tau, state.low_streak + 1,
                             torch.zeros_like(state.low_streak))
    cooldown = (state.cooldown - 1).clamp_min(0)
    trigger = eligible & (low_streak >= s.low_k) & (cooldown == 0) & (draws < s.p_inject)

    # Cosine with every entry of the bank after the insert (the inserted entry is x itself);
    # an entry's norm is its bank norm, the norm of the state when it was banked.
    bank = state.bank.float()
    n = norms.unsqueeze(1)  # [R, 1]
    dots = torch.where(hit, n.square(), torch.bmm(bank, x.unsqueeze(2)).squeeze(2))
    cos = dots / (bank_norm * n).clamp_min(1e-8)
    cos = torch.where(in_use & torch.isfinite(bank_norm), cos, torch.full_like(cos, -torch.inf))
    best_cos, best = cos.max(dim=1)
    injected = trigger & (best_cos >= s.cos_min)
    chosen = bank.gather(1, best.view(-1, 1, 1).expand(-1, 1, x.shape[1])).squeeze(1)
    chosen = torch.where((insert & (best == where)).unsqueeze(1), x, chosen)
    delta = torch.where(injected.unsqueeze(1), s.beta.unsqueeze(1) * (chosen - residual),
                        torch.zeros_like(x))

    low_streak = torch.where(injected, torch.zeros_like(low_streak), low_streak)
    cooldown = torch.where(injected, s.cooldown.to(cooldown.dtype), cooldown)
    keep = ~eligible
    return TttsOutcome(
        bank_norm=torch.where(keep.unsqueeze(1), state.bank_norm, bank_norm),
        low_streak=torch.where(keep, state.low_streak, low_streak),
        cooldown=torch.where(keep, state.cooldown, cooldown),
        inserted_at=torch.where(insert, where, torch.full_like(where, -1)),
        delta=delta, injected=injected, no_match=trigger & ~injected)


TTTS_PARAMS = ("low_k", "gamma", "p_inject", "beta", "cooldown", "bank_k", "cos_min")


class Banks:
    """The banks, streaks and cooldowns of all live requests, in preallocated slot buffers.

    Memory per request is bounded by (BANK_K + 1) x hidden size x patched layers (the extra
    entry absorbs the writes of rows that insert nothing, so writes need no mask). Buffers
    are allocated when the first ttts token arrives and reused across requests.
    """

    def __init__(self, states: RequestStates, layers: tuple[int, ...], bank_k: int) -> None:
        self.states = states
        self.column = {layer: i for i, layer in enumerate(layers)}
        self.k = bank_k
        self._allocated = False

    def _buffers(self, hidden_size: int) -> tuple[torch.Tensor, ...]:
        if not self._allocated:
            n, k = len(self.column), self.k + 1
            self.states.register_buffer("ttts_bank", (n, k, hidden_size), torch.float32)
            self.states.register_buffer("ttts_bank_norm", (n, k), torch.float32, -math.inf)
            self.states.register_buffer("ttts_low_streak", (n,), torch.int64)
            self.states.register_buffer("ttts_cooldown", (n,), torch.int64)
            self._allocated = True
        return tuple(self.states.buffer(name) for name in
                     ("ttts_bank", "ttts_bank_norm", "ttts_low_streak", "ttts_cooldown"))

    def read(self, slots: torch.Tensor, layer: int, hidden_size: int) -> BankState:
        bank, norm, streak, cooldown = self._buffers(hidden_size)
        c = self.column[layer]
        # index_select on the leading dim copies whole contiguous entries: far cheaper than
        # advanced indexing over (slot, layer, entry).
        return BankState(bank[:, c].index_select(0, slots)[:, :self.k],
                         norm[:, c].index_select(0, slots)[:, :self.k],
                         streak[:, c].index_select(0, slots),
                         cooldown[:, c].index_select(0, slots))

    def write(self, slots: torch.Tensor, layer: int, out: TttsOutcome,
              x: torch.Tensor) -> None:
        bank, norm, streak, cooldown = self._buffers(x.shape[1])
        c = self.column[layer]
        at = out.inserted_at
        rows = torch.where(at >= 0, at, torch.full_like(at, self.k))
        bank[slots, c, rows] = x  # only the inserted entry changes (or the spare one)
        norm[slots, c, :self.k] = out.bank_norm
        streak[slots, c] = out.low_streak
        cooldown[slots, c] = out.cooldown

    def live(self, method_id: int) -> int:
        """Banks of live ttts requests (one per patched layer each)."""
        return int((self.states.live_methods() == method_id).sum()) * len(self.column)

    def nbytes(self) -> int:
        if not self._allocated:
            return 0
        return sum(self.states.buffer(name).numel() * self.states.buffer(name).element_size()
                   for name in ("ttts_bank", "ttts_bank_norm", "ttts_low_streak",
                                "ttts_cooldown"))
