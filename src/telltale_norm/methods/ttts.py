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

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch

from telltale_norm.requests import COL, RequestStates


@dataclass(frozen=True)
class BankState:
    """Per (request, layer) state, one row per request: banks `[R, K, H]`, norms `[R, K]`
    (-inf marks an empty entry), low streaks and cooldowns `[R]`.

    With `bank_rows`, `bank` is a larger store and request i's bank is `bank[bank_rows[i]]`:
    a step then reads only the banks it needs (see `ttts_step`)."""

    bank: torch.Tensor
    bank_norm: torch.Tensor
    low_streak: torch.Tensor
    cooldown: torch.Tensor
    bank_rows: torch.Tensor | None = None

    def banks(self, rows: torch.Tensor | None) -> torch.Tensor:
        """The banks of requests `rows` (None: all), `[len(rows), K, H]`."""
        if self.bank_rows is not None:
            rows = self.bank_rows if rows is None else self.bank_rows[rows]
        bank = self.bank if rows is None else self.bank.index_select(0, rows)
        return bank.float()


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
        return cls(*(params[:, COL[f"ttts_{f.name}"]] for f in dataclasses.fields(cls)))


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
    may_inject: bool = True  # False: known without a device sync that no row injected

    def next_state(self, before: BankState, x: torch.Tensor) -> BankState:
        """The state after this step, given the one before and the step's states `x`."""
        bank = before.banks(None).clone()
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
    norms of `x`. Every rule is one or two tensor operations over all rows. Only rows that
    trigger an injection need their bank itself (the cosine search); on the CPU those rows
    are picked out first, which costs no device synchronisation and spares reading every
    bank at every step; elsewhere all banks are searched, without a host sync.
    """
    k = state.bank_norm.shape[1]
    entries = _entries(k, x.device)
    in_use = entries < s.bank_k.unsqueeze(1)  # [R, K]

    # Bank insert: replace the lowest-norm entry (empty ones are -inf) if x is higher.
    lowest, where = state.bank_norm.masked_fill(~in_use, torch.inf).min(dim=1)
    insert = eligible & (norms > tau) & (norms > lowest)
    hit = insert.unsqueeze(1) & (entries == where.unsqueeze(1))  # [R, K]
    n = norms.unsqueeze(1)  # [R, 1]
    bank_norm = torch.where(hit, n, state.bank_norm)  # unchanged where not eligible

    low_streak = torch.where(norms < s.gamma * tau, state.low_streak + 1, 0)
    cooldown = (state.cooldown - 1).clamp_min(0)
    trigger = eligible & (low_streak >= s.low_k) & (cooldown == 0) & (draws < s.p_inject)

    rows = torch.nonzero(trigger).squeeze(1) if x.device.type == "cpu" else None
    if rows is not None and not len(rows):  # nothing triggered: no search, no injection
        injected, delta = trigger, torch.zeros_like(x)
    else:
        usable = in_use & torch.isfinite(bank_norm)
        if rows is None:
            best_cos, chosen = _nearest(x, n, state.banks(None), bank_norm, usable, hit)
        else:
            best_cos, chosen = torch.full_like(norms, -torch.inf), torch.zeros_like(x)
            best_cos[rows], chosen[rows] = _nearest(x[rows], n[rows], state.banks(rows),
                                                    bank_norm[rows], usable[rows], hit[rows])
        injected = trigger & (best_cos >= s.cos_min)
        delta = torch.where(injected.unsqueeze(1), s.beta.unsqueeze(1) * (chosen - residual),
                            0.0)
        low_streak = torch.where(injected, 0, low_streak)
        cooldown = torch.where(injected, s.cooldown.to(cooldown.dtype), cooldown)
    return TttsOutcome(
        bank_norm=bank_norm,
        low_streak=torch.where(eligible, low_streak, state.low_streak),
        cooldown=torch.where(eligible, cooldown, state.cooldown),
        inserted_at=torch.where(insert, where, -1),
        delta=delta, injected=injected, no_match=trigger & ~injected,
        may_inject=rows is None or bool(len(rows)))


def _nearest(x: torch.Tensor, n: torch.Tensor, bank: torch.Tensor, bank_norm: torch.Tensor,
             usable: torch.Tensor, hit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the highest cosine between `x` and a usable entry of its bank after this
    step's insert (`hit`: the entry that became x), and that entry (of the highest norm
    among equals). An entry's norm is its bank norm, the norm of the state when it was
    banked."""
    dots = torch.bmm(x.unsqueeze(1), bank.transpose(1, 2)).squeeze(1)  # [S, K]
    dots = torch.where(hit, n.square(), dots)
    cos = (dots / (bank_norm * n).clamp_min(1e-8)).masked_fill(~usable, -torch.inf)
    best_cos = cos.amax(dim=1)
    # ties (parallel states) go to the entry of highest norm
    best = torch.where(cos == best_cos.unsqueeze(1), bank_norm, -torch.inf).argmax(dim=1)
    chosen = bank.gather(1, best.view(-1, 1, 1).expand(-1, 1, x.shape[1])).squeeze(1)
    return best_cos, torch.where(hit.gather(1, best.unsqueeze(1)), x, chosen)


class Banks:
    """The banks, streaks and cooldowns of all live requests, and the log of their
    injections, in preallocated slot buffers.

    Memory per request: (BANK_K + 1) x hidden size x patched layers for the banks (the extra
    entry absorbs the writes of rows that insert nothing, so writes need no mask) and
    (`log_capacity` + 1) x hidden size for the log of its injections, replayed when a
    preempted request is recomputed (the extra row absorbs writes likewise; injections past
    the capacity are counted, not logged).
    Buffers are allocated when the first ttts token arrives and reused across requests.
    """

    def __init__(self, states: RequestStates, layers: tuple[int, ...], bank_k: int,
                 log_capacity: int) -> None:
        self.states = states
        self.column = {layer: i for i, layer in enumerate(layers)}
        self.k = bank_k
        self.log_capacity = log_capacity
        self._allocated = False

    def _buffer(self, name: str, hidden_size: int) -> torch.Tensor:
        if not self._allocated:
            n, k, c = len(self.column), self.k + 1, self.log_capacity + 1
            register = self.states.register_buffer
            register("ttts_bank", (n, k, hidden_size), torch.float32)
            register("ttts_bank_norm", (n, self.k), torch.float32, -math.inf)
            register("ttts_streaks", (n, 2), torch.float32)  # low streak, cooldown
            register("ttts_log_key", (c,), torch.int64, -1)  # position x layers + column
            register("ttts_log_delta", (c, hidden_size), torch.float32)
            register("ttts_log_count", (), torch.int64)
            self._allocated = True
        return self.states.buffer(name)

    def read(self, slots: torch.Tensor, layer: int, hidden_size: int) -> BankState:
        c = self.column[layer]
        # index_select on the leading dim copies whole contiguous entries: far cheaper than
        # advanced indexing over (slot, layer, entry).
        streaks = self._buffer("ttts_streaks", hidden_size)[:, c].index_select(0, slots)
        return BankState(  # the banks are read by ttts_step, only where it needs them
            self._buffer("ttts_bank", hidden_size)[:, c, :self.k],
            self._buffer("ttts_bank_norm", hidden_size)[:, c].index_select(0, slots),
            streaks[:, 0], streaks[:, 1], bank_rows=slots)

    def write(self, slots: torch.Tensor, layer: int, out: TttsOutcome,
              x: torch.Tensor) -> None:
        # index_copy_ over flat (slot, layer[, entry]) rows: cheaper than index_put
        hidden_size, n = x.shape[1], len(self.column)
        rows = slots * n + self.column[layer]
        at = torch.where(out.inserted_at >= 0, out.inserted_at, self.k)  # or the spare entry
        self._buffer("ttts_bank", hidden_size).view(-1, hidden_size).index_copy_(
            0, rows * (self.k + 1) + at, x)
        self._buffer("ttts_bank_norm", hidden_size).view(-1, self.k).index_copy_(
            0, rows, out.bank_norm)
        self._buffer("ttts_streaks", hidden_size).view(-1, 2).index_copy_(0, rows, torch.stack(
            [out.low_streak, out.cooldown.to(out.low_streak.dtype)], 1).float())

    def log(self, slots: torch.Tensor, position: torch.Tensor, layers: list[int],
            injected: list[torch.Tensor], deltas: list[torch.Tensor]) -> torch.Tensor:
        """Append one step's injections (per layer of `layers`: `[R]` flags, `[R, H]` deltas)
        to the requests' logs; returns how many did not fit, per layer."""
        inj = torch.stack(injected)  # [L, R]
        hidden_size = deltas[0].shape[1]
        count = self._buffer("ttts_log_count", hidden_size)[slots]
        at = count + inj.cumsum(0) - inj.long()  # each injection's row in its request's log
        logged = inj & (at < self.log_capacity)
        at = torch.where(logged, at, self.log_capacity)
        cols = torch.tensor([self.column[layer] for layer in layers], device=slots.device)
        key = torch.where(logged, position * len(self.column) + cols.unsqueeze(1), -1)
        rows = slots.expand(len(layers), -1)
        self._buffer("ttts_log_key", hidden_size)[rows, at] = key
        self._buffer("ttts_log_delta", hidden_size)[rows, at] = torch.stack(deltas)
        self._buffer("ttts_log_count", hidden_size)[slots] = count + logged.sum(0)
        return (inj & ~logged).sum(1)

    def logged_delta(self, slots: torch.Tensor, position: torch.Tensor, layer: int,
                     hidden_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The delta injected at (`slots`, `position`) on `layer` when it was decoded, zero
        where there was none, and where there was one."""
        if not self.log_capacity:
            return torch.zeros(len(slots), hidden_size, device=slots.device), \
                torch.zeros_like(slots, dtype=torch.bool)
        key = position * len(self.column) + self.column[layer]
        match = self._buffer("ttts_log_key", hidden_size)[slots, :self.log_capacity] \
            == key.unsqueeze(1)
        found = match.any(1)
        delta = self._buffer("ttts_log_delta", hidden_size)[slots, match.int().argmax(1)]
        return torch.where(found.unsqueeze(1), delta, 0.0), found

    def live(self, method_id: int) -> int:
        """Banks of live ttts requests (one per patched layer each)."""
        return int((self.states.live_methods() == method_id).sum()) * len(self.column)

    def nbytes(self) -> int:
        if not self._allocated:
            return 0
        return sum(self.states.buffer(name).numel() * self.states.buffer(name).element_size()
                   for name in ("ttts_bank", "ttts_bank_norm", "ttts_streaks", "ttts_log_key",
                                "ttts_log_delta", "ttts_log_count"))
