"""Per-request norm traces: each decode step's norm, tau and intervention, per patched layer.

Every patched layer writes its tokens' (norm, tau, action) into one fixed device buffer, the
step's *record* `[tokens, patched layers, 3]` (a slice write, no scatter). After the forward,
a step with traced tokens (`VLLM_PATCH_TRACE=1` / `telltale_trace=1`, and always under
`rerank`) copies its rows to the host without waiting; the copy is read after vLLM's own
per-step synchronisation (`collect`, at the end of the step), appended to the traces that are
*kept* (`telltale_trace=1`) and returned, so rerank rows can travel with the step's outputs
(`push.py`). So traces take no device memory per request and need no host synchronisation of
their own. When a kept request finishes, its trace moves to an outbox for the caller.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from telltale_norm.batch import StepPlan
from telltale_norm.requests import RequestStates

# Bits of the `action` channel.
ACTION_SUPPRESS = 1
ACTION_RERUN = 2
ACTION_INJECT = 4
ACTION_NAMES = {ACTION_SUPPRESS: "suppress", ACTION_RERUN: "rerun", ACTION_INJECT: "inject"}

OUTBOX_LIMIT = 10_000
NORM, TAU, ACTION = range(3)  # channels of the record


@dataclass(frozen=True)
class RequestTrace:
    """One finished request's trace: arrays of shape [decode steps, layers]."""

    request_id: str
    layers: tuple[int, ...]
    norm: np.ndarray
    tau: np.ndarray
    action: np.ndarray
    index: int = 0  # the candidate of an n > 1 request
    scores: dict[str, float] | None = None  # rerank scores (A, B, C, D, mean, score)

    def to_dict(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "index": self.index, "scores": self.scores,
                "layers": list(self.layers),
                "norm": self.norm.tolist(), "tau": self.tau.tolist(),
                "action": self.action.tolist()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RequestTrace:
        layers = tuple(int(x) for x in data["layers"])
        shape = (-1, len(layers))
        return cls(str(data["request_id"]), layers,
                   np.asarray(data["norm"], dtype=np.float32).reshape(shape),
                   np.asarray(data["tau"], dtype=np.float32).reshape(shape),
                   np.asarray(data["action"], dtype=np.uint8).reshape(shape),
                   int(data.get("index", 0)), data.get("scores"))


@dataclass
class _Pending:
    """A step's record on its way to the host, and which of its rows to keep."""

    # the record [tokens, layers, 3] and loop's bits [tokens, layers] on the host (filled
    # once `ready` is done)
    rows: tuple[torch.Tensor, torch.Tensor]
    ready: torch.cuda.Event | None
    token: np.ndarray  # index of each kept token in the step
    slot: np.ndarray
    decode_step: np.ndarray


class TraceRecorder:
    """The step's record buffer, the host traces of live traced requests, and the outbox."""

    def __init__(self, states: RequestStates, layers: tuple[int, ...], max_tokens: int,
                 max_steps: int, device: torch.device) -> None:
        self.states = states
        self.layers = layers
        self.max_steps = max_steps
        self.column = {layer: i for i, layer in enumerate(layers)}
        self.record = torch.zeros(max_tokens, len(layers), 3, dtype=torch.float32,
                                  device=device)
        # loop's re-run bits, written by loop's Python after the compiled step (a buffer of
        # its own: the graph's write of the record could land after them)
        self.loop_action = torch.zeros(max_tokens, len(layers), dtype=torch.float32,
                                       device=device)
        pin = device.type == "cuda"
        self._host = (torch.zeros(max_tokens, len(layers), 3, pin_memory=pin),
                      torch.zeros(max_tokens, len(layers), pin_memory=pin))
        self._pending: _Pending | None = None
        self._steps: dict[int, list[np.ndarray]] = {}  # slot -> recorded rows [layers, 3]
        rows = states.capacity + 1
        self.kept = np.zeros(rows, dtype=bool)  # traces kept for the caller (by slot)
        self._seen = np.zeros(rows, dtype=np.int64)  # decode steps recorded (by slot)
        self.outbox: OrderedDict[str, RequestTrace] = OrderedDict()
        self.dropped = 0  # traces dropped from a full outbox
        self.steps_dropped = 0  # decode steps past VLLM_PATCH_TRACE_MAX_STEPS

    def end_step(self, plan: StepPlan) -> None:
        """Start copying the step's record to the host if it has traced decode tokens."""
        if not plan.recorded:
            return
        keep = plan.decode & self.states.traced[plan.token_slot]
        token = np.flatnonzero(keep)
        t = plan.num_tokens
        rows = (self._host[0][:t], self._host[1][:t])
        rows[0].copy_(self.record[:t], non_blocking=True)
        rows[1].copy_(self.loop_action[:t], non_blocking=True)
        ready = None
        if self.record.is_cuda:
            ready = torch.cuda.Event()
            ready.record()
        self._pending = _Pending(rows, ready, token, plan.token_slot[token],
                                 plan.decode_step[token])

    def admit(self, slot: int, keep: bool) -> None:
        """A traced request took `slot`; `keep` its trace for the caller (`take`)."""
        self.kept[slot] = keep
        self._seen[slot] = 0

    def collect(self) -> list[tuple[int, np.ndarray]]:
        """Append the last step's copied rows to the kept traces; returns every new row as
        (slot, row [layers, 3]) (empty when the step recorded none, or was collected)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return []
        if pending.ready is not None:
            pending.ready.synchronize()  # done already: vLLM synchronised after the step
        rows = pending.rows[0].numpy()[pending.token]
        rows[:, :, ACTION] += pending.rows[1].numpy()[pending.token]  # loop's bits too
        new = []
        for slot, step, row in zip(pending.slot.tolist(), pending.decode_step.tolist(), rows):
            if step >= self.max_steps:
                self.steps_dropped += 1
            elif step == self._seen[slot]:  # the next decode step (never one seen before)
                self._seen[slot] += 1
                row = row.copy()
                new.append((slot, row))
                if self.kept[slot]:
                    self._steps.setdefault(slot, []).append(row)
        return new

    def finish(self, req_id: str, slot: int,
               scorer: Callable[[np.ndarray, np.ndarray], dict[str, float]] | None) -> None:
        """Move a finished request's trace, on its own layers, to the outbox, scored by
        `scorer(norm, tau)` when given."""
        rows = self._steps.pop(slot, [])
        data = (np.stack(rows) if rows else np.zeros((0, len(self.layers), 3), np.float32))
        own = [i for i, layer in enumerate(self.layers) if self.states.layers[slot, layer]]
        norm, tau = data[:, own, NORM], data[:, own, TAU]
        action = data[:, own, ACTION].astype(np.uint8)
        layers = tuple(self.layers[i] for i in own)
        self.outbox[req_id] = RequestTrace(req_id, layers, norm, tau, action,
                                           scores=scorer(norm, tau) if scorer else None)
        while len(self.outbox) > OUTBOX_LIMIT:  # nobody collects: keep memory bounded
            self.outbox.popitem(last=False)
            self.dropped += 1

    def discard(self, slot: int) -> None:
        self._steps.pop(slot, None)
        self.kept[slot] = False

    def take(self, wanted: Callable[[str], bool] | None = None) -> list[RequestTrace]:
        """Remove and return the finished traces whose id is `wanted` (all when None)."""
        keys = [key for key in self.outbox if wanted is None or wanted(key)]
        return [self.outbox.pop(key) for key in keys]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.record, self.loop_action))
