"""ERSS state of every slot, and the per-layer ttts step of a whole batch step.

`Banks` holds each slot's banks, streaks and cooldowns and the log of its injections, in
buffers allocated once. `ttts_layer` runs `ttts_step` (methods/ttts.py) on a step's ttts
decode tokens (at most one per slot, listed first in the step's `ttts_rows`), writes their
new state back, and puts logged injections back into tokens recomputed after a
preemption. Both are graph-safe: fixed shapes, no host synchronisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from telltale_norm.norms import residual_stream, shifted_residual_stream
from telltale_norm.methods.ttts import (BankInsert, BankState, TttsOutcome, TttsSettings,
                                        bank_insert, ttts_step)
from telltale_norm.requests import RequestStates
from telltale_norm.traced import stack_columns


class Banks:
    """The banks, streaks and cooldowns of all slots, and the log of their injections, in
    slot buffers allocated once (`RequestStates.register_buffer`).

    Memory per slot and patched layer: (BANK_K + 1) x hidden size in the model's dtype for
    the bank (the extra entry absorbs the writes of rows that insert nothing, so writes need
    no mask) and BANK_K x 4 + 8 bytes of norms and streaks; per slot, (`log_capacity` + 1) x
    (hidden size in the model's dtype + 8 bytes) for the log of its injections: each
    injected token's new hidden row, put back when a preempted request is recomputed
    (injections past the capacity are counted, not logged). Per step, hidden size x 4
    bytes per slot to stage the step's states for the bank search.
    """

    def __init__(self, states: RequestStates, layers: tuple[int, ...], bank_k: int,
                 log_capacity: int, hidden_size: int, dtype: torch.dtype) -> None:
        self.column = {layer: i for i, layer in enumerate(layers)}
        self.k = bank_k
        self.log_capacity = log_capacity
        n, k, c = len(layers), bank_k + 1, log_capacity + 1
        register = states.register_buffer
        self.bank = register("ttts_bank", (n, k, hidden_size), dtype)
        self.bank_norm = register("ttts_bank_norm", (n, bank_k), torch.float32, -math.inf)
        self.streaks = register("ttts_streaks", (n, 2), torch.float32)  # low streak, cooldown
        self.log_key = register("ttts_log_key", (c,), torch.int64, -1)  # position x n + col
        self.log_row = register("ttts_log_row", (c, hidden_size), dtype)
        self.log_count = register("ttts_log_count", (), torch.int64)
        # the step's states, staged for the bank search (`staged`): per step, not per slot
        self.staging = torch.zeros(states.capacity, hidden_size, device=states.device)
        self._names = ("ttts_bank", "ttts_bank_norm", "ttts_streaks", "ttts_log_key",
                       "ttts_log_row", "ttts_log_count")
        self.states = states

    # Traced, every access indexes a whole buffer with index tensors (views are taken of the
    # result, never of the buffer): the compiler then writes the buffers in place, where a
    # view of a buffer makes it copy the whole buffer on every step. A layer's column
    # (`self.column[layer]`) comes as a [1] device tensor, so every layer runs the same code.
    @staticmethod
    def _at(slots: torch.Tensor, column: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return slots, column.expand_as(slots)

    def read(self, slots: torch.Tensor, column: torch.Tensor) -> BankState:
        """The state of `slots` on the layer of `column`; its banks are read for the rows
        that trigger, the null slot's for the others (`BankState.bank`)."""
        at = self._at(slots, column)
        streaks = self.streaks[at]

        def bank(trigger: torch.Tensor) -> torch.Tensor:
            searched = torch.where(trigger, slots, self.states.null_slot)
            return self.bank[self._at(searched, column)][:, :self.k]

        return BankState(bank, self.bank_norm[at], streaks[:, 0], streaks[:, 1])

    def insert(self, slots: torch.Tensor, column: torch.Tensor, x: torch.Tensor,
               norms: torch.Tensor, tau: torch.Tensor, eligible: torch.Tensor,
               bank_k: torch.Tensor) -> BankInsert:
        """Write the states `x` into the entries they take (`bank_insert`) before the bank
        is read: traced, reads of a buffer still pending when it is written are first
        copied out, and a read after the write reads the bank where it lies."""
        slots, column = self._at(slots, column)
        insert = bank_insert(norms, tau, eligible, self.bank_norm[slots, column], bank_k)
        at = torch.where(insert.at >= 0, insert.at, self.k)  # or the spare entry
        self.bank.index_put_((slots, column, at), x.to(self.bank.dtype))
        return insert

    def staged(self, x: torch.Tensor) -> torch.Tensor:
        """`x` `[rows, H]` float32, written to a buffer and read back: traced, the bank
        search then reads each row's state where it lies, where it otherwise recomputes it
        from the layer's two outputs for every bank entry (batch 32: the six layers' step
        0.49 -> 0.37 ms, hot)."""
        rows = torch.arange(len(x), device=x.device)
        self.staging.index_put_((rows,), x)
        return self.staging[rows]

    def write(self, slots: torch.Tensor, column: torch.Tensor, out: TttsOutcome) -> None:
        """Write the norms, streaks and cooldowns of the step's outcome."""
        slots, column = self._at(slots, column)
        self.bank_norm.index_put_((slots, column), out.bank_norm)
        self.streaks.index_put_((slots, column), stack_columns(
            [out.low_streak.float(), out.cooldown.float()]))

    def log(self, slots: torch.Tensor, position: torch.Tensor, column: torch.Tensor,
            injected: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Log the injected tokens' new hidden `rows` for replay; returns how many did not
        fit (a 0-dim tensor)."""
        count = self.log_count[slots]
        logged = injected & (count < self.log_capacity)
        at = torch.where(logged, count, self.log_capacity)  # or the spare entry
        key = position * len(self.column) + column
        self.log_key[slots, at] = torch.where(logged, key, -1)
        self.log_row[slots, at] = rows.to(self.log_row.dtype)
        self.log_count[slots] = count + logged.long()
        return (injected & ~logged).sum()

    def logged_rows(self, slots: torch.Tensor, position: torch.Tensor, column: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The hidden rows logged for (`slots`, `position`) on the layer of `column` when
        they were decoded, and where there was one."""
        if not self.log_capacity:  # nothing is logged (TTTS_REPLAY_LOG=0)
            return (self.log_row[slots, torch.zeros_like(slots)],
                    torch.zeros_like(slots, dtype=torch.bool))
        key = position * len(self.column) + column
        # one search: the first match, or entry 0 (found only if that one matches)
        at = (self.log_key[slots][:, :self.log_capacity] == key.unsqueeze(1)).int().argmax(1)
        return self.log_row[slots, at], self.log_key[slots, at] == key

    def live(self, slots: list[int], method_id: int) -> int:
        """Banks of live ttts requests (one per patched layer each)."""
        return int((self.states.method[slots] == method_id).sum()) * len(self.column)

    def nbytes(self) -> int:
        return sum(self.states.buffer(n).numel() * self.states.buffer(n).element_size()
                   for n in self._names)


@dataclass(frozen=True)
class TttsLayerResult:
    """One layer's ttts outcome for the step's tokens (`[tokens]`) and its counts."""

    hidden: torch.Tensor
    injected: torch.Tensor  # bool [tokens]
    injections: torch.Tensor  # 0-dim counts
    no_match: torch.Tensor
    unlogged: torch.Tensor
    replayed: torch.Tensor
    max_low_streak: torch.Tensor


def ttts_layer(banks: Banks, column: torch.Tensor, h: torch.Tensor,
               r: torch.Tensor | None, norms: torch.Tensor, tau: torch.Tensor,
               rows: torch.Tensor, slots: torch.Tensor, token_row: torch.Tensor,
               acting: torch.Tensor, slot: torch.Tensor, position: torch.Tensor,
               draws: torch.Tensor, params: torch.Tensor, replay: torch.Tensor
               ) -> TttsLayerResult:
    """ERSS on one layer for a step (its bank `column`, a [1] device tensor): `rows` index
    the step's ttts decode tokens and `slots` are theirs (the null slot for padding rows),
    `token_row` is each token's index in `rows` (-1 for the others); `acting`, `slot`,
    `position`, `draws` (uniforms of `rng.STREAM_TTTS`) and `params` are per token of the
    step; `replay` marks the recomputed output tokens of ttts requests. Rows that may not
    act keep their state: every write leaves it as it was."""
    # slots as the host wrote them, not masked on the device: traced, a read of the bank
    # indexed by them is then cheap enough to stay in place (the search's read, masked by
    # the trigger in `Banks.read`, also stays in place: one select per index, seen in the
    # generated code)
    valid = (slots != banks.states.null_slot) & acting[rows]
    res = None if r is None else r[rows].float()
    x = banks.staged(residual_stream(h[rows], res))
    settings = TttsSettings.from_params(params[rows])
    norms, tau = norms[rows], tau[rows]
    insert = banks.insert(slots, column, x, norms, tau, valid, settings.bank_k)
    out = ttts_step(x, torch.zeros_like(x) if res is None else res, norms, tau, valid,
                    draws[rows], banks.read(slots, column), settings, insert)
    # x + delta, written back as hidden rows (rows that inject nothing keep their bits)
    row = token_row.clamp_min(0)
    injected = (token_row >= 0) & out.injected[row]
    hidden = torch.where(injected.unsqueeze(1), shifted_residual_stream(h, out.delta[row]), h)
    unlogged = banks.log(slots, position[rows], column, out.injected, hidden[rows])
    logged, found = banks.logged_rows(slot, position, column)
    found = found & replay
    # Last: traced, the compiler moves each read next to its first use, and a buffer is
    # written in place only if no read of it lands after this write.
    banks.write(slots, column, out)
    return TttsLayerResult(
        hidden=torch.where(found.unsqueeze(1), logged, hidden), injected=injected,
        injections=out.injected.sum(), no_match=out.no_match.sum(), unlogged=unlogged,
        replayed=found.sum(), max_low_streak=torch.where(valid, out.low_streak, 0).max())
