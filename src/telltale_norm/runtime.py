"""The per-worker engine of telltale-norm: batch -> per-token norms -> per-request state -> edits.

Pure torch and numpy; it knows nothing of vLLM. The vLLM adapter feeds it plain arrays once
per step (`begin_step`), calls `on_layer` (or the graph-safe `layer_step` directly) after
each patched decoder layer, and reports finished requests (`release`). Every device buffer
is allocated here, once, for `max_num_seqs` requests and `max_num_tokens` tokens per step;
per-step work on the host loops over requests, never over tokens.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from telltale_norm.batch import StepBuffers, StepPlan, advance_plan, plan_step
from telltale_norm.config import ConfigError, TelltaleConfig, check_request
from telltale_norm.layer import STEP_COUNTERS, LayerStep
from telltale_norm.methods.loop import LOOP_COUNTERS, Agree, LoopLayer, Rerun
from telltale_norm.methods.rerank import candidate_scores
from telltale_norm.methods.ttts_banks import Banks
from telltale_norm.push import PushQueue
from telltale_norm.requests import COL, METHOD_ID, OFF, RequestStates, request_row
from telltale_norm.thresholds import StreamingQuantiles, adaptive_tau
from telltale_norm.traces import TraceRecorder

logger = logging.getLogger("vllm.telltale_norm")

TTTS, RERANK = METHOD_ID["ttts"], METHOD_ID["rerank"]

# What the adapter tells about a request the first time it is scheduled: its
# SamplingParams.extra_args, its seed (None when unseeded) and its sample index (n > 1).
RequestInfo = Callable[[str], tuple[Mapping[str, Any] | None, int | None, int]]
COUNTERS = (*STEP_COUNTERS[:2], *LOOP_COUNTERS, *STEP_COUNTERS[2:])  # in stats' order


class TelltaleRuntime:
    """Holds one worker's request states, threshold statistics, counters and traces."""

    def __init__(self, config: TelltaleConfig, num_layers: int, hidden_size: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 max_num_seqs: int = 64, max_num_tokens: int = 2048, max_len: int = 4096,
                 agree: Agree | None = None) -> None:
        self.config = config
        self.num_layers = num_layers
        self.device = torch.device(device)
        self.patched_layers = config.patched_layers(num_layers)
        self.states = RequestStates(num_layers, max_num_seqs, self.device)
        self.quantiles = StreamingQuantiles(num_layers, self.device)
        self._patched_rows = _rows(self.patched_layers, self.device)
        step_counters, loop_counters = (
            torch.zeros(len(names), num_layers, dtype=torch.float64, device=self.device)
            for names in (STEP_COUNTERS, LOOP_COUNTERS))
        self.counters = {**{name: step_counters[i] for i, name in enumerate(STEP_COUNTERS)},
                         **{name: loop_counters[i] for i, name in enumerate(LOOP_COUNTERS)}}
        self.decode_steps = 0
        self.prefill_steps = 0
        self.rejected_requests = 0  # ran unpatched: bad settings, or no slot left
        self.traces = TraceRecorder(self.states, self.patched_layers, max_num_tokens,
                                    config.trace_max_steps or max_len, self.device)
        self.banks = Banks(self.states, self.patched_layers, config.ttts_bank_k,
                           config.ttts_replay_log, hidden_size, dtype)
        self.buffers = StepBuffers(self.states, self.patched_layers, max_num_tokens)
        self._decode_steps = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.layer_step = LayerStep(self.states, self.buffers, self.quantiles, step_counters,
                                    self.banks, self.traces, self._decode_steps,
                                    config.loop_possible)
        self.loop_layer = LoopLayer(
            self.buffers, loop_counters,
            self.traces.loop_action, self.traces.column, agree)
        # rerank requests: rows pushed with the outputs; kept traces scored when they finish
        self.push = PushQueue(self.patched_layers)
        self.rerank_requests = 0
        self._scorers: dict[int, Callable[[np.ndarray, np.ndarray], dict]] = {}
        self._plan: StepPlan | None = None  # the current step's (None outside a step)
        # the last step's requests and plan, for `advance_plan`: valid until a release (a
        # freed slot may be taken by another request, a request id may come back)
        self._last: tuple[tuple[str, ...], StepPlan] | None = None
        self._unpatched: set[str] = set()  # live requests that run on the null slot
        self.start_line = ""  # what the adapter logged when it attached this runtime
        # layers whose norms this rank records (pipeline parallel: its own stage's)
        self.owned_layers: frozenset[int] = frozenset(range(num_layers))

    # ------------------------------------------------------------ requests
    def admit(self, req_id: str, extra_args: Mapping[str, Any] | None, seed: int | None,
              sample_index: int, prompt_len: int) -> int:
        """Give a newly scheduled request its slot (the null slot when it runs unpatched).
        Samples of one prompt (n > 1) share their settings but draw from different seeds."""
        try:
            cfg = self.config.with_request(extra_args)
            check_request(cfg, self.config, self.num_layers)
            # vLLM already gives sample i of a seeded request the seed `seed + i`.
            seed = cfg.random_seed + sample_index if seed is None else seed
            row = request_row(cfg, self.num_layers, seed % 2**63)
        except ConfigError as err:
            # The frontend validates requests before they reach a worker; this only guards
            # requests that bypassed it. Never fail the batch: run this one unpatched.
            return self._unpatched_slot(req_id, str(err))
        slot = self.states.admit(req_id, row, prompt_len)
        if slot is None:
            return self._unpatched_slot(
                req_id, f"all {self.states.capacity} slots are taken (more live requests "
                        "than max_num_seqs, e.g. preempted ones)")
        self.traces.admit(slot, keep=cfg.trace and row.method != OFF)
        if row.method == RERANK:
            self._admit_rerank(slot, req_id, cfg)
        return slot

    def _admit_rerank(self, slot: int, req_id: str, cfg: TelltaleConfig) -> None:
        """Rerank rows travel with the request's outputs (`take_push`); a kept trace is also
        scored on the host when the request finishes."""
        self.rerank_requests += 1
        layers = [layer for layer in self.patched_layers if self.states.layers[slot, layer]]
        self.push.add(slot, req_id, cfg, [layer for layer in layers
                                          if layer in self.owned_layers])
        if cfg.trace:
            self._scorers[slot] = functools.partial(
                candidate_scores, metric=cfg.rerank_metric, layer_agg=cfg.rerank_layer_agg,
                late_frac=cfg.rerank_late_frac)

    def _unpatched_slot(self, req_id: str, why: str) -> int:
        logger.error("telltale-norm: request %s runs unpatched: %s", req_id, why)
        self.rejected_requests += 1
        self._unpatched.add(req_id)
        return self.states.null_slot

    def _slot(self, req_id: str, info: RequestInfo, prompt_len: int) -> int:
        slot = self.states.slot(req_id)
        if slot is not None:
            return slot
        if req_id in self._unpatched:
            return self.states.null_slot
        return self.admit(req_id, *info(req_id), prompt_len)

    def release(self, req_ids: Sequence[str]) -> None:
        """Free finished or aborted requests; traced ones leave their trace in the outbox."""
        self.traces.collect()
        states = self.states
        if req_ids:
            self._last = None
        for req_id in req_ids:
            self._unpatched.discard(req_id)
            slot = states.slot(req_id)
            if slot is None:
                continue
            scorer = self._scorers.pop(slot, None)
            self.push.discard(slot)
            if self.traces.kept[slot]:
                self.traces.finish(req_id, slot, scorer)
            self.traces.discard(slot)
            states.release(req_id)

    def take_push(self, has_output: Callable[[str], bool]) -> dict[str, dict[str, Any]]:
        """After the step (vLLM has synchronised): the payload of each rerank request for
        the step's outputs (`push.py`); `has_output(req_id)`: the step sampled a token."""
        rows = self.traces.collect()
        if not len(self.push):
            return {}
        return self.push.take(rows, has_output)

    # ------------------------------------------------------------ steps
    def begin_step(self, req_ids: Sequence[str], num_scheduled: np.ndarray,
                   num_computed: np.ndarray, num_prompt: np.ndarray,
                   request_info: RequestInfo) -> None:
        """Describe a step's tokens (arrays per request, in batch order) to the layer steps:
        admits new requests, then writes the step's metadata into the fixed buffers."""
        self.traces.collect()
        states = self.states
        requests, plan = tuple(req_ids), None
        if self._last is not None and requests == self._last[0]:
            plan = advance_plan(self._last[1], states, num_scheduled, num_computed)
        if plan is None:
            slots = np.fromiter((self._slot(r, request_info, prompt)
                                 for r, prompt in zip(req_ids, num_prompt)),
                                dtype=np.int64, count=len(req_ids))
            plan = plan_step(states, slots, num_scheduled, num_computed)
            self.loop_layer.limit = int(states.params[plan.loop_decode,
                                                      COL["loop_max_extra"]].max(initial=0))
        self._last = requests, plan
        self.prefill_steps += not plan.decode.all()
        self.decode_steps += plan.patched_decode
        if self.config.loop_possible:
            self.traces.loop_action.zero_()  # no stale re-run bits in this step's traces
        states.sync()
        if plan.adaptive:  # else no token of the step reads the quartiles
            self.quantiles.refresh_quartiles(self._patched_rows)
        self.buffers.write(plan)
        self._decode_steps.fill_(self.decode_steps)
        self._plan = plan

    def end_step(self) -> None:
        """The step's forward is done: start moving its traced rows to the host."""
        if self._plan is not None:
            self.buffers.close()
            self.traces.end_step(self._plan)
        self._plan = None

    def on_layer(self, layer: int, hidden: torch.Tensor, residual: torch.Tensor | None,
                 rerun: Rerun | None = None) -> None:
        """`layer_step`, then loop's re-runs where `rerun` is given (it runs this layer
        again without writing the KV cache), editing the layer's outputs in place."""
        if self._plan is None or layer not in self.patched_layers:
            return
        new_hidden, _, gate = self.layer_step(layer, hidden, residual)
        hidden.copy_(new_hidden)
        if rerun is not None and residual is not None and gate is not None:
            self.loop_layer(layer, hidden, residual, gate, rerun)

    # ------------------------------------------------------------ statistics
    def default_tau(self, layer: int) -> float | None:
        """Tau of `layer` under the engine's default settings (None while warming up)."""
        fixed = self.config.fixed_tau()
        if layer in fixed:
            return fixed[layer]
        if self.decode_steps < self.config.warmup_steps:
            return None
        q1, q3 = self.quantiles.quartiles(layer)
        tau = adaptive_tau(q1, q3, self.config.adaptive_iqr_k, self.config.adaptive_min_iqr,
                           self.config.adaptive_tau_floor)
        return None if torch.isnan(tau) else float(tau)

    def reset_stats(self) -> None:
        """Zero the counters and norm statistics (adaptive tau starts learning again)."""
        for counter in self.counters.values():
            counter.zero_()
        self.quantiles.reset()
        self.decode_steps = self.prefill_steps = self.rejected_requests = 0
        self.rerank_requests = 0

    def memory(self) -> dict[str, int]:
        """Device bytes the plugin holds, by owner (all allocated at start)."""
        staging = self.banks.staging
        return {"slot_bytes": self.states.nbytes() - self.banks.nbytes(),
                "bank_bytes": self.banks.nbytes(),
                "step_bytes": self.buffers.nbytes() + self.traces.nbytes() + staging.nbytes,
                "stats_bytes": self.quantiles.nbytes() + 8 * len(COUNTERS) * self.num_layers}

    def snapshot(self) -> dict[str, Any]:
        """Counters and per-layer norm statistics as plain JSON-able values."""
        self.traces.collect()
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
        memory = self.memory()
        return {
            "method": self.config.method,
            "start_line": self.start_line,
            "patched_layers": list(self.patched_layers),
            "num_layers": self.num_layers,
            "decode_steps": self.decode_steps,
            "prefill_steps": self.prefill_steps,
            "live_requests": len(self.states),
            "slots": self.states.capacity,
            "rejected_requests": self.rejected_requests,
            "rerank_requests": self.rerank_requests,
            "traces_waiting": len(self.traces.outbox),
            "traces_dropped": self.traces.dropped,
            "trace_steps_dropped": self.traces.steps_dropped,
            "live_banks": self.banks.live(self.states.live_slots(), TTTS),
            **memory,
            "plugin_bytes": sum(memory.values()),
            "per_layer": per_layer,
        }


def _rows(layers: Sequence[int], device: torch.device) -> slice | torch.Tensor:
    """Rows of `layers` in a per-layer buffer: a slice when they are consecutive (the
    default PATCHED_LAYERS), which reads them in place, else an index tensor."""
    if list(layers) == list(range(layers[0], layers[-1] + 1)):
        return slice(layers[0], layers[-1] + 1)
    return torch.tensor(layers, dtype=torch.int64, device=device)
