"""The per-layer step: one decoder layer's output -> per-token norms -> thresholds -> edits.

`LayerStep.__call__` is graph-safe: tensor operations only, on buffers at fixed addresses
(the slot tables, the step's metadata, the statistics, the banks, the record), no host
synchronisation, no Python branching on data, no allocation whose size depends on data.
Every row of the layer's input is processed (padding rows point at the null slot and change
nothing), so the same code runs eagerly, traced into vLLM's compiled model, or replayed
inside a CUDA graph. Traced or captured, it does the work of every method; run eagerly, it
skips the work of methods no token of the step uses (the step's mix is known on the host
before the forward). Only loop's re-runs need Python and a host synchronisation:
`methods.loop.LoopLayer` runs them after this step, from the `gate` it returns (each
token's norm and, for the tokens loop may act on, its tau).
"""

from __future__ import annotations

import math

import torch

from telltale_norm import rng
from telltale_norm.batch import DECODE, REPLAY, StepBuffers
from telltale_norm.methods.suppress import suppress_layer
from telltale_norm.methods.ttts_banks import Banks, ttts_layer
from telltale_norm.norms import token_norms
from telltale_norm.requests import COL, METHOD_ID, RequestStates
from telltale_norm.thresholds import StreamingQuantiles, adaptive_tau
from telltale_norm.traces import ACTION_INJECT, ACTION_SUPPRESS, TraceRecorder

SUPPRESS, LOOP, TTTS = METHOD_ID["suppress"], METHOD_ID["loop"], METHOD_ID["ttts"]
EVERY_METHOD = frozenset(METHOD_ID.values())
ACTING = frozenset({SUPPRESS, LOOP, TTTS})  # the methods that need tau

# Per-layer counters of this step, kept on the device and read only for statistics (loop's
# own are in methods/loop.py: its Python writes them, never the compiled graph).
STEP_COUNTERS = (
    "tokens",  # decode tokens observed (their norms feed the adaptive tau)
    "suppressed",  # suppress: tokens shrunk
    "injections",  # ttts: bank states injected
    "injections_replayed",  # ttts: logged injections applied again to recomputed tokens
    "injections_unlogged",  # ttts: injections past a request's log capacity (not replayable)
    "inject_no_match",  # ttts: triggers that found no bank state with cosine >= COS_MIN
    "max_low_streak",  # ttts: the longest low-norm streak seen (a maximum, not a sum)
)
C = {name: i for i, name in enumerate(STEP_COUNTERS)}


class LayerStep:
    """The per-layer work of every method, over state owned by the runtime."""

    def __init__(self, states: RequestStates, step: StepBuffers, quantiles: StreamingQuantiles,
                 counters: torch.Tensor, banks: Banks, recorder: TraceRecorder,
                 decode_steps: torch.Tensor) -> None:
        self.states, self.step, self.quantiles = states, step, quantiles
        self.counters, self.banks, self.recorder = counters, banks, recorder
        self.decode_steps = decode_steps  # [1] int64 on the device, written once per step

    def __call__(self, layer: int, hidden: torch.Tensor, residual: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """The layer's new `(hidden, residual)` for the current step (inputs untouched),
        and loop's `gate` `[tokens, 2]`: each token's norm, and its tau where loop may act
        on it (NaN elsewhere)."""
        t = hidden.shape[0]
        tables, step, count = self.states.tables, self.step, self.counters[:, layer]
        slot = step.token_slot[:t]
        flags = step.flags[:t]
        decode, replay = (flags & DECODE) != 0, (flags & REPLAY) != 0
        method = tables["method"][slot]
        params = tables["params"][slot]
        in_layer = tables["layers"][slot, layer] & step.live
        observe = in_layer & decode
        new = ~replay  # counted once: replayed tokens were counted when they were decoded

        norms = token_norms(hidden, residual)
        self.quantiles.update(layer, norms, observe)
        count[C["tokens"]] += observe.sum()
        # Eagerly, the step's mix (known on the host) skips the work no token needs; a
        # traced or captured step does all of it, since it is replayed for every later mix.
        every = _graph_building(hidden)
        methods = EVERY_METHOD if every else step.methods
        column = self.recorder.column.get(layer) if every or step.recorded else None
        if column is None and not methods & ACTING:
            return hidden, residual, torch.stack([norms, torch.full_like(norms, math.nan)], 1)
        tau, ready = self._tau(layer, tables["tau"][slot, layer], params)
        edit = in_layer & ready & (decode | replay)
        gate = torch.stack([norms, torch.where(edit & (method == LOOP), tau, math.nan)], 1)
        action = torch.zeros_like(norms)
        if layer in self.banks.column and TTTS in methods:
            hidden, injected = self._ttts(layer, hidden, residual, norms, tau, in_layer & ready,
                                          params, slot, replay & in_layer & (method == TTTS),
                                          count)
            action = action + injected * ACTION_INJECT
        if SUPPRESS in methods:
            hidden, suppressed = self._suppress(layer, hidden, residual, norms, tau, params,
                                                slot, in_layer & ready & (method == SUPPRESS),
                                                decode | replay)
            count[C["suppressed"]] += (suppressed & new).sum()
            action = action + suppressed * ACTION_SUPPRESS
        if column is not None:
            self.recorder.record[:t, column] = torch.stack(
                [norms, torch.where(in_layer, tau, math.nan), action], 1)
        return hidden, residual, gate

    def _tau(self, layer: int, fixed: torch.Tensor, params: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token tau for `layer`, and whether it may be acted on (not warming up)."""
        q1, q3 = self.quantiles.quartiles(layer)
        adaptive = adaptive_tau(q1.float(), q3.float(), params[:, COL["iqr_k"]],
                                params[:, COL["min_iqr"]], params[:, COL["tau_floor"]])
        warm = self.decode_steps > params[:, COL["warmup_steps"]]
        is_fixed = ~torch.isnan(fixed)
        tau = torch.where(is_fixed, fixed, torch.where(warm, adaptive, math.inf))
        return tau, is_fixed | warm

    def _suppress(self, layer: int, h: torch.Tensor, r: torch.Tensor | None,
                  norms: torch.Tensor, tau: torch.Tensor, params: torch.Tensor,
                  slot: torch.Tensor, eligible: torch.Tensor, output: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        draws = rng.uniform(self.states.tables["seed"][slot], rng.STREAM_SUPPRESS, layer,
                            self.step.position[:len(slot)])
        return suppress_layer(h, r, norms, tau, params, eligible, output, draws)

    def _ttts(self, layer: int, h: torch.Tensor, r: torch.Tensor | None, norms: torch.Tensor,
              tau: torch.Tensor, acting: torch.Tensor, params: torch.Tensor, slot: torch.Tensor,
              replay: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        step = self.step
        t = h.shape[0]
        rows = step.ttts_rows[:min(t, self.states.capacity)]  # one decode token per slot
        out = ttts_layer(self.banks, layer, h, r, norms, tau, rows,
                         step.ttts_valid[:len(rows)] & acting[rows], slot, step.position[:t],
                         self.states.tables["seed"][slot], params, replay)
        for name, value in (("injections", out.injections), ("inject_no_match", out.no_match),
                            ("injections_unlogged", out.unlogged),
                            ("injections_replayed", out.replayed)):
            count[C[name]] += value
        count[C["max_low_streak"]] = torch.maximum(count[C["max_low_streak"]],
                                                   out.max_low_streak.double())
        return out.hidden, out.injected


def _graph_building(hidden: torch.Tensor) -> bool:
    """The step is being traced by the compiler or captured into a CUDA graph."""
    return torch.compiler.is_compiling() or (
        hidden.is_cuda and torch.cuda.is_current_stream_capturing())
