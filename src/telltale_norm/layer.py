"""The per-layer step: one decoder layer's output -> per-token norms -> thresholds -> edits.

`LayerStep.__call__` is graph-safe: tensor operations only, on buffers at fixed addresses
(the step's metadata and its tokens' settings, the statistics, the banks, the record), no host
synchronisation, no Python branching on data, no allocation whose size depends on data.
Every row of the layer's input is processed (padding rows point at the null slot and change
nothing), so the same code runs eagerly, traced into vLLM's compiled model, or replayed
inside a CUDA graph. Traced or captured, it does the work of every method; run eagerly, it
skips the work of methods no token of the step uses (the step's mix is known on the host
before the forward). Only loop's re-runs need Python and a host synchronisation:
`methods.loop.LoopLayer` runs them after this step, from the `gate` it returns on engines
where loop is possible (each token's norm, its tau where it enters loop's window, and how
many tokens of the step enter it).

Traced, every patched layer runs the same code on the same buffers: what tells layers apart
is a small device tensor per layer (its *key*: the layer index and its column in the banks
and the record), never a Python number. The step is a nested compile region, so the
compiler traces and compiles it once and calls it at every patched layer, however many
layers are patched (docs/BENCHMARKS.md: a compiled start 1.13x a plain one).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from telltale_norm import rng
from telltale_norm.batch import DECODE, REPLAY, StepBuffers
from telltale_norm.methods.suppress import suppress_layer
from telltale_norm.methods.ttts_banks import Banks, ttts_layer
from telltale_norm.norms import token_norms
from telltale_norm.requests import ACTING, COL, METHOD_ID, RequestStates
from telltale_norm.thresholds import StreamingQuantiles, adaptive_tau
from telltale_norm.traced import stack_columns
from telltale_norm.traces import ACTION_INJECT, ACTION_SUPPRESS, TraceRecorder

SUPPRESS, LOOP, TTTS = METHOD_ID["suppress"], METHOD_ID["loop"], METHOD_ID["ttts"]
EVERY_METHOD = frozenset(METHOD_ID.values())


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
# a layer's key: its index and its column in the banks and the record, as [1] tensors (an
# index that is a 0-dim tensor would be read on the host)
LAYER, COLUMN = slice(0, 1), slice(1, 2)


class LayerStep:
    """The per-layer work of every method, over state owned by the runtime."""

    def __init__(self, states: RequestStates, step: StepBuffers, quantiles: StreamingQuantiles,
                 counters: torch.Tensor, banks: Banks, recorder: TraceRecorder,
                 decode_steps: torch.Tensor, loop_possible: bool) -> None:
        self.states, self.step, self.quantiles = states, step, quantiles
        self.counters, self.banks, self.recorder = counters, banks, recorder
        self.decode_steps = decode_steps  # [1] int64 on the device, written once per step
        self.loop_possible = loop_possible  # the engine's: else no gate is computed
        # one key per patched layer: (layer, its column in the banks and the record)
        self.keys = {layer: torch.tensor([layer, column], device=counters.device)
                     for layer, column in banks.column.items()}
        self._counter_rows = torch.arange(len(STEP_COUNTERS), device=counters.device)
        self._is_max = self._counter_rows == C["max_low_streak"]
        # compiled once, called at every layer (a closure: its only inputs are tensors)
        self._traced = torch.compiler.nested_compile_region(
            lambda hidden, residual, key: self._step(hidden, residual, key, EVERY_METHOD, True))

    def __call__(self, layer: int, hidden: torch.Tensor, residual: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The layer's new `(hidden, residual)` for the current step (inputs untouched),
        and, where loop is possible, loop's `gate` `[tokens, 3]`: each token's norm, its tau
        where it enters loop's window (NaN elsewhere), and on every row the number of
        tokens that enter it (loop's Python reads one number when none does)."""
        key = self.keys[layer]
        if _graph_building(hidden):  # replayed for every later mix: do every method's work
            out = self._traced(hidden, residual, key)
        else:  # eagerly, the step's mix (known on the host) skips the work no token needs
            out = self._step(hidden, residual, key, self.step.methods, self.step.recorded)
        return out[0], residual, out[1] if self.loop_possible else None

    def _step(self, hidden: torch.Tensor, residual: torch.Tensor | None, key: torch.Tensor,
              methods: frozenset[int], recorded: bool) -> tuple[torch.Tensor, ...]:
        """`(hidden,)`, and `(hidden, gate)` where loop is possible."""
        t = hidden.shape[0]
        layer, column = key[LAYER], key[COLUMN]
        step = self.step
        slot = step.token_slot[:t]
        flags = step.flags[:t]
        decode, replay = (flags & DECODE) != 0, (flags & REPLAY) != 0
        method = step.method[:t]
        params = step.params[:t]
        in_layer = (step.layer_on[column][0, :t] != 0) & step.live
        observe = in_layer & decode
        new = ~replay  # counted once: replayed tokens were counted when they were decoded

        norms = token_norms(hidden, residual)
        self.quantiles.update(layer, norms, observe)
        counts = {"tokens": observe.sum()}
        if not (recorded or methods & ACTING):  # no token acts or is recorded with tau
            self._count(layer, counts)
            return (hidden, *self._gate(norms, norms, lambda: torch.zeros_like(observe)))
        tau, ready = self._tau(layer, step.layer_tau[column][0, :t], params)
        edit = in_layer & ready & (decode | replay)
        gate = self._gate(norms, tau, lambda: (
            edit & (method == LOOP) & (norms > tau)
            & (norms < params[:, COL["loop_blowup"]] * tau)
            & (params[:, COL["loop_max_extra"]] >= 1)))
        action = torch.zeros_like(norms)
        if methods & {SUPPRESS, TTTS}:  # one draw per token, from its method's stream
            draws = rng.draw(step.layer_key[column][0, :t], step.position[:t])
        if TTTS in methods:
            r = min(t, self.states.capacity)  # one decode token per slot
            out = ttts_layer(self.banks, column, hidden, residual, norms, tau,
                             step.ttts_rows[:r], step.ttts_slot[:r], step.ttts_row[:t],
                             in_layer & ready, slot,
                             step.position[:t], draws, params,
                             replay & in_layer & (method == TTTS))
            hidden = out.hidden
            counts.update(injections=out.injections, inject_no_match=out.no_match,
                          injections_unlogged=out.unlogged, injections_replayed=out.replayed,
                          max_low_streak=out.max_low_streak)
            action = action + out.injected * ACTION_INJECT
        if SUPPRESS in methods:
            hidden, suppressed = suppress_layer(
                hidden, residual, norms, tau, params, in_layer & ready & (method == SUPPRESS),
                decode | replay, draws)
            counts["suppressed"] = (suppressed & new).sum()
            action = action + suppressed * ACTION_SUPPRESS
        if recorded:
            self.recorder.record.index_put_(
                (torch.arange(t, device=hidden.device), column.expand(t)),
                stack_columns([norms, torch.where(in_layer, tau, math.nan), action]))
        self._count(layer, counts)
        return (hidden, *gate)

    def _gate(self, norms: torch.Tensor, tau: torch.Tensor,
              entering: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Loop's gate (see `__call__`) where loop is possible, else nothing (nor the mask
        `entering()` of the tokens that enter loop's window)."""
        if not self.loop_possible:
            return ()
        enters = entering()
        return (stack_columns([norms, torch.where(enters, tau, math.nan),
                               enters.sum().float().expand_as(norms)]),)

    def _tau(self, layer: torch.Tensor, fixed: torch.Tensor, params: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token tau for `layer`, and whether it may be acted on (not warming up)."""
        quartiles = self.quantiles.step_quartiles[layer]  # as of the step's start
        adaptive = adaptive_tau(quartiles[:, 0], quartiles[:, 1], params[:, COL["iqr_k"]],
                                params[:, COL["min_iqr"]], params[:, COL["tau_floor"]])
        warm = self.decode_steps > params[:, COL["warmup_steps"]]
        is_fixed = ~torch.isnan(fixed)
        tau = torch.where(is_fixed, fixed, torch.where(warm, adaptive, math.inf))
        return tau, is_fixed | warm

    def _count(self, layer: torch.Tensor, counts: dict[str, torch.Tensor]) -> None:
        """Add the step's counts to the layer's counters: `max_low_streak` keeps a maximum,
        the others sum. Without ttts's counts (an eager step: `tokens`, maybe `suppressed`)
        they are the first counters, added in one scatter."""
        if "max_low_streak" not in counts:
            rows = self._counter_rows[:len(counts)]
            self.counters.index_put_((rows, layer.expand_as(rows)), stack_columns(
                [counts[name].double() for name in STEP_COUNTERS[:len(counts)]]),
                accumulate=True)
            return
        rows = self._counter_rows
        where = (rows, layer.expand_as(rows))
        old = self.counters[where]
        step = stack_columns([counts[name].double() if name in counts else old.new_zeros(())
                              for name in STEP_COUNTERS])
        self.counters.index_put_(where, torch.where(self._is_max, torch.maximum(old, step),
                                                    old + step))


def _graph_building(hidden: torch.Tensor) -> bool:
    """The step is being traced by the compiler or captured into a CUDA graph."""
    return torch.compiler.is_compiling() or (
        hidden.is_cuda and torch.cuda.is_current_stream_capturing())
