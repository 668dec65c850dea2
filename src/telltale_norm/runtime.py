"""The per-worker engine of telltale-norm: batch -> per-token norms -> per-request state -> edits.

Pure torch and numpy; it knows nothing of vLLM. The vLLM adapter feeds it plain arrays once
per step (`begin_step`), calls `on_layer` after each decoder layer with that layer's outputs,
and reports finished requests (`release`). All per-token work is tensor operations over the
whole step; Python loops run over requests (once per step), never over tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from telltale_norm import rng
from telltale_norm.config import ConfigError, TelltaleConfig, check_request
from telltale_norm.methods.loop import Rerun, loop_step
from telltale_norm.methods.rerank import candidate_scores
from telltale_norm.methods.suppress import suppress_factors
from telltale_norm.methods.ttts import Banks, TttsSettings, ttts_step
from telltale_norm.norms import (residual_stream, scale_residual_stream_,
                                  shifted_residual_stream, token_norms)
from telltale_norm.requests import COL, METHOD_ID, RequestStates, request_row
from telltale_norm.thresholds import StreamingQuantiles, adaptive_tau
from telltale_norm.traces import ACTION_INJECT, ACTION_RERUN, ACTION_SUPPRESS, TraceRecorder

logger = logging.getLogger("vllm.telltale_norm")

OFF, SUPPRESS = METHOD_ID["off"], METHOD_ID["suppress"]
LOOP, TTTS, RERANK = METHOD_ID["loop"], METHOD_ID["ttts"], METHOD_ID["rerank"]
ACTING = frozenset({SUPPRESS, LOOP, TTTS})  # methods that edit hidden states

# Per-layer counters kept on the device and read only when statistics are asked for.
COUNTERS = (
    "tokens",  # decode tokens observed (their norms feed the adaptive tau)
    "suppressed",  # suppress: tokens shrunk
    "reruns",  # loop: token re-runs (a token in 2 extra passes counts 2)
    "rerun_tokens",  # loop: tokens that entered a re-run
    "rerun_taken",  # loop: re-run outputs kept (passed every stopping rule)
    "rerun_stopped_tau", "rerun_stopped_growth", "rerun_stopped_blowup",  # loop: why stopped
    "rerun_layer_passes",  # loop: extra executions of the layer (each runs the whole step)
    "injections",  # ttts: bank states injected
    "injections_replayed",  # ttts: logged injections applied again to recomputed tokens
    "injections_unlogged",  # ttts: injections past a request's log capacity (not replayable)
    "inject_no_match",  # ttts: triggers that found no bank state with cosine >= COS_MIN
    "max_low_streak",  # ttts: the longest low-norm streak seen (a maximum, not a sum)
)

# What the adapter tells about a request the first time it is scheduled: its
# SamplingParams.extra_args, its seed (None when unseeded) and its sample index (n > 1).
RequestInfo = Callable[[str], tuple[Mapping[str, Any] | None, int | None, int]]


@dataclass(frozen=True)
class TttsTokens:
    """A step's tokens of ttts requests, one per request: their place in the step, slot and
    position; for decode tokens also their settings and draws on every patched layer."""

    index: torch.Tensor | None  # int64 [R]; None: every token of the step (no gathers)
    slots: torch.Tensor  # int64 [R]
    position: torch.Tensor  # int64 [R]
    settings: TttsSettings | None = None
    draws: torch.Tensor | None = None  # float32 [R, patched layers]

    def take(self, values: torch.Tensor) -> torch.Tensor:
        """These tokens' rows of a per-token tensor of the step."""
        return values if self.index is None else values.index_select(0, self.index)

    def put(self, values: torch.Tensor, rows: torch.Tensor) -> None:
        """Write these tokens' `rows` into the per-token tensor `values`, in place."""
        if self.index is None:
            values.copy_(rows)
        else:
            values.index_copy_(0, self.index, rows)


@dataclass(frozen=True)
class StepBatch:
    """One forward step, flattened: each token's request slot, decode flag and position."""

    num_tokens: int
    token_slot: torch.Tensor  # int64 [T]
    trace_row: torch.Tensor | None  # int64 [T]: row in the trace buffers (None: no tracing)
    decode: torch.Tensor  # bool [T]
    replay: torch.Tensor | None  # bool [T]: output tokens recomputed after a preemption
    position: torch.Tensor  # int64 [T]
    params: torch.Tensor  # float32 [T, PARAM_COLUMNS]: each token's request settings
    tau: torch.Tensor  # float32 [T, num_layers]: each token's fixed tau (NaN: adaptive)
    method: torch.Tensor  # int64 [T]
    layer_mask: torch.Tensor  # bool [T, num_layers]: the token's request acts on the layer
    active_layers: np.ndarray  # bool [num_layers], host
    adaptive_layers: np.ndarray  # bool [num_layers]: some request needs the adaptive tau
    methods: frozenset[int]  # methods of the step's requests, host
    suppress_draws: torch.Tensor | None  # float32 [T, num_layers] when a request needs them
    ttts: TttsTokens | None  # decode tokens of ttts requests
    ttts_replay: TttsTokens | None  # their recomputed output tokens (after a preemption)


class TelltaleRuntime:
    """Holds one worker's request states, threshold statistics and counters."""

    def __init__(self, config: TelltaleConfig, num_layers: int,
                 device: torch.device | str = "cpu", max_len: int = 4096) -> None:
        self.config = config
        self.num_layers = num_layers
        self.device = torch.device(device)
        self.patched_layers = config.patched_layers(num_layers)
        self.states = RequestStates(num_layers, self.device)
        self.states.register_buffer("method", (), torch.int64)
        self.quantiles = StreamingQuantiles(num_layers, self.device)
        self.counters = {name: torch.zeros(num_layers, dtype=torch.float64, device=self.device)
                         for name in COUNTERS}
        self.decode_steps = 0
        self.prefill_steps = 0
        self.rejected_requests = 0
        self.traces = TraceRecorder(self.states, self.patched_layers, max_len)
        self.banks = Banks(self.states, self.patched_layers, config.ttts_bank_k,
                           config.ttts_replay_log)
        self._layer_ids = torch.arange(num_layers, device=self.device)
        self._bank_layers = torch.tensor(self.patched_layers, dtype=torch.int64,
                                         device=self.device)
        self._injections: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # this step's
        self._scorers: dict[int, Callable[[np.ndarray, np.ndarray], dict]] = {}  # rerank slots
        self.step: StepBatch | None = None

    # ------------------------------------------------------------ requests
    def admit(self, req_id: str, extra_args: Mapping[str, Any] | None, seed: int | None,
              sample_index: int, prompt_len: int) -> int:
        """Give a newly scheduled request its slot. Samples of one prompt (n > 1) share
        their settings but draw from different seeds."""
        try:
            cfg = self.config.with_request(extra_args)
            check_request(cfg, self.config, self.num_layers)
            # vLLM already gives sample i of a seeded request the seed `seed + i`.
            seed = cfg.random_seed + sample_index if seed is None else seed
            row = request_row(cfg, self.num_layers, seed % 2**63)
        except ConfigError as err:
            # The frontend validates requests before they reach a worker; this only guards
            # requests that bypassed it. Never fail the batch: run this one unpatched.
            logger.error("telltale-norm: request %s runs unpatched: %s", req_id, err)
            self.rejected_requests += 1
            row = request_row(TelltaleConfig(), self.num_layers, 0)
        slot = self.states.admit(req_id, row, prompt_len)
        self.states.buffer("method")[slot] = row.method
        if row.method == RERANK:  # scored on the host when the request finishes
            self._scorers[slot] = functools.partial(
                candidate_scores, metric=cfg.rerank_metric, layer_agg=cfg.rerank_layer_agg,
                late_frac=cfg.rerank_late_frac)
        return slot

    def release(self, req_ids: Sequence[str]) -> None:
        """Free finished or aborted requests; traced ones leave their trace in the outbox."""
        states = self.states
        for req_id in req_ids:
            slot = states.slot(req_id)
            scorer = self._scorers.pop(slot, None)
            if slot is not None and states.traced[slot]:
                self.traces.finish(req_id, slot,
                                   int(states.high_water[slot] - states.prompt_len[slot] + 1),
                                   scorer)
            states.release(req_id)

    # ------------------------------------------------------------ steps
    def begin_step(self, req_ids: Sequence[str], num_scheduled: np.ndarray,
                   num_computed: np.ndarray, num_prompt: np.ndarray,
                   request_info: RequestInfo) -> None:
        """Map a step's flattened tokens to requests. Arrays are per request, in batch order.

        A token is a decode token when its position is at or past the request's prompt length
        and past every position this request had computed before. Output tokens recomputed
        after a preemption are *replay* tokens: the stateless edits (suppress, loop) are
        applied to them again, as when they were decoded, so the KV cache gets the same keys
        and values, but they are not observed or counted a second time.
        """
        states = self.states
        slots = np.fromiter(
            (states.slot(r) if r in states else self.admit(r, *request_info(r), prompt)
             for r, prompt in zip(req_ids, num_prompt)), dtype=np.int64, count=len(req_ids))
        num_scheduled = np.asarray(num_scheduled, dtype=np.int64)
        num_computed = np.asarray(num_computed, dtype=np.int64)
        num_tokens = int(num_scheduled.sum())
        tok_req = np.repeat(np.arange(len(req_ids)), num_scheduled)
        first_tok = np.cumsum(num_scheduled) - num_scheduled
        position = num_computed[tok_req] + np.arange(num_tokens) - first_tok[tok_req]
        output = position >= np.asarray(num_prompt, dtype=np.int64)[tok_req]
        fresh = position > states.high_water[slots][tok_req]
        decode, replay = output & fresh, output & ~fresh
        states.high_water[slots] = np.maximum(states.high_water[slots],
                                              num_computed + num_scheduled - 1)

        methods = states.method[slots]
        active_tok = methods[tok_req] != OFF
        self.prefill_steps += bool((~decode).any())
        self.decode_steps += bool((decode & active_tok).any())
        active_layers = states.layers_host[slots].any(axis=0)
        if not active_layers.any():
            self.step = None
            return
        to_dev = lambda a: torch.from_numpy(a).to(self.device, non_blocking=True)  # noqa: E731
        token_slot = to_dev(slots[tok_req])
        method = states.buffer("method")[token_slot]
        params = states.buffer("params")[token_slot]
        position_dev = to_dev(position)
        seed = states.buffer("seed")
        traced = states.traced[slots][tok_req]
        trace_row = None
        if traced.any():
            decode_step = position - np.asarray(num_prompt, dtype=np.int64)[tok_req]
            trace_row = to_dev(self.traces.row_index(traced, decode, decode_step))

        def ttts_tokens(which: np.ndarray, decoding: bool) -> TttsTokens | None:
            index = np.flatnonzero(which & (methods[tok_req] == TTTS))
            if not len(index):
                return None
            # a step of ttts decode tokens only (the usual case) needs no gathers
            tokens = TttsTokens(None if len(index) == num_tokens else to_dev(index),
                                token_slot, position_dev)
            tokens = dataclasses.replace(tokens, slots=tokens.take(token_slot),
                                         position=tokens.take(position_dev))
            if not decoding:
                return tokens
            return dataclasses.replace(
                tokens, settings=TttsSettings.from_params(tokens.take(params)),
                draws=rng.uniform_per_layer(seed[tokens.slots], rng.STREAM_TTTS,
                                            self._bank_layers, tokens.position))

        self.step = StepBatch(
            num_tokens=num_tokens,
            token_slot=token_slot,
            trace_row=trace_row,
            decode=to_dev(decode),
            replay=to_dev(replay) if replay.any() else None,
            position=position_dev,
            params=params,
            tau=states.buffer("tau").index_select(0, token_slot),
            method=method,
            layer_mask=states.buffer("layers")[token_slot] & (method != OFF).unsqueeze(1),
            active_layers=active_layers,
            adaptive_layers=states.adaptive_host[slots].any(axis=0),
            methods=frozenset(int(m) for m in np.unique(methods) if m != OFF),
            suppress_draws=(rng.uniform_per_layer(seed[token_slot], rng.STREAM_SUPPRESS,
                                                  self._layer_ids, position_dev)
                            if states.random_suppress[slots].any() else None),
            ttts=ttts_tokens(decode, decoding=True),
            ttts_replay=ttts_tokens(replay, decoding=False),
        )

    def end_step(self) -> None:
        """The step's forward is done: log its ttts injections (for replay), once per step."""
        if self._injections:
            layers, injected, deltas = zip(*self._injections)
            self._injections = []
            unlogged = self.banks.log(self.step.ttts.slots, self.step.ttts.position,
                                      list(layers), list(injected), list(deltas))
            self.counters["injections_unlogged"].index_add_(
                0, self._bank_layers.new_tensor(layers), unlogged.double())
        self.step = None

    def on_layer(self, layer: int, hidden: torch.Tensor, residual: torch.Tensor | None,
                 rerun: Rerun | None = None) -> None:
        """Observe and edit one decoder layer's output for the current step, in place.

        `rerun` runs this layer again without writing the KV cache (needed by loop)."""
        step = self.step
        if step is None or not step.active_layers[layer]:
            return
        t = step.num_tokens  # the forward may be padded past the scheduled tokens
        h = hidden[:t]
        r = None if residual is None else residual[:t]
        slot, params, method = step.token_slot, step.params, step.method
        in_layer = step.layer_mask[:, layer]
        observe = in_layer & step.decode

        norms = token_norms(h, r)
        self.quantiles.update(layer, norms, observe)
        self.counters["tokens"][layer] += observe.sum()
        if not step.methods & ACTING and step.trace_row is None:
            return  # monitor, and rerank's untraced neighbours: observing is all; no tau
        tau, ready = self._tau(layer, params, step.adaptive_layers[layer])
        action = torch.zeros_like(slot, dtype=torch.uint8)  # ACTION_* bits per token

        edit = step.decode if step.replay is None else step.decode | step.replay
        if LOOP in step.methods and rerun is not None and residual is not None:
            eligible = in_layer & (method == LOOP) & ready & edit
            action |= self._loop(layer, hidden, residual, norms, tau, eligible, params, rerun)
        if step.ttts is not None and layer in self.banks.column:
            injected = self._ttts(layer, h, r, norms, tau, in_layer & ready, step.ttts)
            step.ttts.put(action, step.ttts.take(action) | injected.to(torch.uint8)
                          * ACTION_INJECT)
        if step.ttts_replay is not None and layer in self.banks.column:
            self._ttts_replay(layer, h, step.ttts_replay)
        if SUPPRESS in step.methods:
            only_decode = params[:, COL["suppress_only_decode"]] > 0
            eligible = in_layer & (method == SUPPRESS) & ready & (edit | ~only_decode)
            action |= self._suppress(layer, h, r, norms, tau, eligible, params, step)

        if step.trace_row is not None:
            self.traces.record(layer, slot, step.trace_row, in_layer, norms, tau, action)

    def _count(self, values: torch.Tensor) -> torch.Tensor:
        """Sum of per-token values over the step, replay tokens left out (counted before)."""
        replay = self.step.replay
        return values.sum() if replay is None else torch.where(replay, 0, values).sum()

    def _loop(self, layer: int, hidden: torch.Tensor, residual: torch.Tensor,
              norms: torch.Tensor, tau: torch.Tensor, eligible: torch.Tensor,
              params: torch.Tensor, rerun: Rerun) -> torch.Tensor:
        """ALRR on the whole (padded) layer output; returns ACTION_RERUN bits per token."""
        result = loop_step(
            hidden, residual, norms.shape[0], norms, tau, eligible,
            max_extra=params[:, COL["loop_max_extra"]].long(),
            growth_eps=params[:, COL["loop_growth_eps"]],
            blowup=params[:, COL["loop_blowup"]], alpha=params[:, COL["loop_alpha"]],
            rerun=rerun)
        counters = self.counters
        counters["reruns"][layer] += self._count(result.runs)
        counters["rerun_tokens"][layer] += self._count(result.entered)
        counters["rerun_taken"][layer] += self._count(result.taken)
        counters["rerun_stopped_tau"][layer] += self._count(result.stopped_tau)
        counters["rerun_stopped_growth"][layer] += self._count(result.stopped_growth)
        counters["rerun_stopped_blowup"][layer] += self._count(result.stopped_blowup)
        counters["rerun_layer_passes"][layer] += result.layer_passes
        return (result.taken > 0).to(torch.uint8) * ACTION_RERUN

    def _suppress(self, layer: int, h: torch.Tensor, r: torch.Tensor | None,
                  norms: torch.Tensor, tau: torch.Tensor, eligible: torch.Tensor,
                  params: torch.Tensor, step: StepBatch) -> torch.Tensor:
        """suppress on the step's tokens; returns ACTION_SUPPRESS bits per token."""
        draws = (step.suppress_draws[:, layer] if step.suppress_draws is not None
                 else torch.ones_like(norms))  # unused without random-mode requests
        factor, chosen = suppress_factors(
            norms, tau, eligible,
            random_mode=params[:, COL["suppress_random"]] > 0, draws=draws,
            p=params[:, COL["suppress_p"]],
            clamp_action=params[:, COL["suppress_clamp"]] > 0,
            mul_scale=params[:, COL["suppress_mul_scale"]],
            clamp_div=params[:, COL["suppress_clamp_div"]])
        scale_residual_stream_(h, r, factor)
        self.counters["suppressed"][layer] += self._count(chosen)
        return chosen.to(torch.uint8) * ACTION_SUPPRESS

    def _ttts(self, layer: int, h: torch.Tensor, r: torch.Tensor | None, norms: torch.Tensor,
              tau: torch.Tensor, eligible: torch.Tensor, tokens: TttsTokens) -> torch.Tensor:
        """ERSS on the step's ttts decode tokens; returns which of them got an injection."""
        hx = tokens.take(h)
        res = None if r is None else tokens.take(r).float()
        x = residual_stream(hx, res)
        out = ttts_step(x, torch.zeros_like(x) if res is None else res, tokens.take(norms),
                        tokens.take(tau), tokens.take(eligible),
                        tokens.draws[:, self.banks.column[layer]],
                        self.banks.read(tokens.slots, layer, x.shape[1]), tokens.settings)
        self.banks.write(tokens.slots, layer, out, x)
        counters = self.counters
        if out.may_inject:
            tokens.put(h, shifted_residual_stream(hx, out.delta))
            self._injections.append((layer, out.injected, out.delta))
            counters["injections"][layer] += out.injected.sum()
            counters["inject_no_match"][layer] += out.no_match.sum()
        counters["max_low_streak"][layer] = torch.maximum(
            counters["max_low_streak"][layer], out.low_streak.max().double())
        return out.injected

    def _ttts_replay(self, layer: int, h: torch.Tensor, tokens: TttsTokens) -> None:
        """Inject again, into recomputed tokens, what was injected when they were decoded,
        so the KV cache gets the keys and values it had (the banks are not touched)."""
        delta, found = self.banks.logged_delta(tokens.slots, tokens.position, layer,
                                               h.shape[1])
        tokens.put(h, shifted_residual_stream(tokens.take(h), delta))
        self.counters["injections_replayed"][layer] += found.sum()

    def _tau(self, layer: int, params: torch.Tensor,
             adaptive_needed: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token tau for `layer`, and whether it may be acted on (not warming up)."""
        fixed = self.step.tau[:, layer]
        if not adaptive_needed:  # every request of the step has a fixed tau here
            return fixed, torch.ones_like(fixed, dtype=torch.bool)
        q1, q3 = self.quantiles.quantiles(layer, [0.25, 0.75]).float()
        adaptive = adaptive_tau(q1, q3, params[:, COL["iqr_k"]], params[:, COL["min_iqr"]],
                                params[:, COL["tau_floor"]])
        warm = self.decode_steps > params[:, COL["warmup_steps"]]
        is_fixed = ~torch.isnan(fixed)
        tau = torch.where(is_fixed, fixed, torch.where(warm, adaptive,
                                                        torch.full_like(adaptive, math.inf)))
        return tau, is_fixed | warm

    # ------------------------------------------------------------ statistics
    def default_tau(self, layer: int) -> float | None:
        """Tau of `layer` under the engine's default settings (None while warming up)."""
        fixed = self.config.fixed_tau()
        if layer in fixed:
            return fixed[layer]
        if self.decode_steps < self.config.warmup_steps:
            return None
        q1, q3 = self.quantiles.quantiles(layer, [0.25, 0.75])
        tau = adaptive_tau(q1, q3, self.config.adaptive_iqr_k, self.config.adaptive_min_iqr,
                           self.config.adaptive_tau_floor)
        return None if torch.isnan(tau) else float(tau)

    def reset_stats(self) -> None:
        """Zero the counters and norm statistics (adaptive tau starts learning again)."""
        for counter in self.counters.values():
            counter.zero_()
        self.quantiles = StreamingQuantiles(self.num_layers, self.device)
        self.decode_steps = self.prefill_steps = self.rejected_requests = 0

    def snapshot(self) -> dict[str, Any]:
        """Counters and per-layer norm statistics as plain JSON-able values."""
        counters = {name: c.tolist() for name, c in self.counters.items()}
        layers = sorted(set(self.patched_layers)
                        | {i for i, n in enumerate(counters["tokens"]) if n})
        per_layer = {}
        for layer in layers:
            q1, median, q3 = self.quantiles.quantiles(layer, [0.25, 0.5, 0.75]).tolist()
            entry: dict[str, Any] = {
                name: int(counters[name][layer]) for name in COUNTERS}
            entry.update(mean=self.quantiles.mean(layer), q1=q1, median=median, q3=q3,
                         tau=self.default_tau(layer))
            per_layer[str(layer)] = {k: (None if isinstance(v, float) and math.isnan(v) else v)
                                     for k, v in entry.items()}
        return {
            "method": self.config.method,
            "patched_layers": list(self.patched_layers),
            "num_layers": self.num_layers,
            "decode_steps": self.decode_steps,
            "prefill_steps": self.prefill_steps,
            "live_requests": len(self.states),
            "rejected_requests": self.rejected_requests,
            "traces_waiting": len(self.traces.outbox),
            "traces_dropped": self.traces.dropped,
            "live_banks": self.banks.live(TTTS),
            "bank_bytes": self.banks.nbytes(),
            "per_layer": per_layer,
        }
