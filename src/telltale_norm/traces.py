"""Per-request norm traces: each decode step's norm, tau and intervention, per patched layer.

A traced request (`VLLM_PATCH_TRACE=1` / `telltale_trace=1`, and always under `rerank`) owns
rows of a preallocated device buffer indexed by (slot, decode step, layer); writes are
scatter ops with no host synchronisation (untraced tokens land in a spare row). When the
request finishes, its rows are copied to the host once and kept in an outbox for the caller.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from telltale_norm.requests import RequestStates

# Bits of the `action` channel.
ACTION_SUPPRESS = 1
ACTION_RERUN = 2
ACTION_INJECT = 4
ACTION_NAMES = {ACTION_SUPPRESS: "suppress", ACTION_RERUN: "rerun", ACTION_INJECT: "inject"}

OUTBOX_LIMIT = 10_000


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


class TraceRecorder:
    """Device buffers of traced requests, and the outbox of finished ones."""

    def __init__(self, states: RequestStates, layers: tuple[int, ...], max_len: int) -> None:
        self.states = states
        self.layers = layers
        self.max_len = max_len
        self.column = {layer: i for i, layer in enumerate(layers)}
        self.outbox: OrderedDict[str, RequestTrace] = OrderedDict()
        self.dropped = 0
        self._allocated = False

    def _buffers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self._allocated:  # allocated on first use: untraced engines pay nothing
            shape = (self.max_len + 1, len(self.layers))  # +1: the spare row
            self.states.register_buffer("trace_norm", shape, torch.float32)
            self.states.register_buffer("trace_tau", shape, torch.float32)
            self.states.register_buffer("trace_action", shape, torch.uint8)
            self._allocated = True
        return (self.states.buffer("trace_norm"), self.states.buffer("trace_tau"),
                self.states.buffer("trace_action"))

    def row_index(self, traced: np.ndarray, decode: np.ndarray,
                  decode_step: np.ndarray) -> np.ndarray:
        """Per token: its trace row, or the spare row when it is not recorded."""
        keep = traced & decode & (decode_step >= 0) & (decode_step < self.max_len)
        return np.where(keep, decode_step, self.max_len)

    def record(self, layer: int, slot: torch.Tensor, row: torch.Tensor, keep: torch.Tensor,
               norms: torch.Tensor, tau: torch.Tensor, action: torch.Tensor) -> None:
        """Write one layer's values of the step; tokens not in `keep` (their request is not
        patched on this layer) go to the spare row, so a trace never depends on neighbours."""
        column = self.column.get(layer)
        if column is None:
            return
        norm_buf, tau_buf, action_buf = self._buffers()
        row = torch.where(keep, row, self.max_len)
        norm_buf[slot, row, column] = norms
        tau_buf[slot, row, column] = tau.float()
        action_buf[slot, row, column] = action.to(torch.uint8)

    def finish(self, req_id: str, slot: int, num_steps: int,
               scorer: Callable[[np.ndarray, np.ndarray], dict[str, float]] | None) -> None:
        """Move a finished request's first `num_steps` rows, on its own layers, to the
        outbox, scored by `scorer(norm, tau)` when given (one device-to-host copy)."""
        norm_buf, tau_buf, action_buf = self._buffers()
        n = max(0, min(num_steps, self.max_len))
        own = [i for i, layer in enumerate(self.layers) if self.states.layers_host[slot, layer]]
        # Copies: on the CPU `.cpu()` would return a view of the slot, reused by the next request.
        norm, tau, action = (buf[slot, :n][:, own].to("cpu", copy=True).numpy()
                             for buf in (norm_buf, tau_buf, action_buf))
        layers = tuple(self.layers[i] for i in own)
        self.outbox[req_id] = RequestTrace(req_id, layers, norm, tau, action,
                                           scores=scorer(norm, tau) if scorer else None)
        while len(self.outbox) > OUTBOX_LIMIT:  # nobody collects: keep memory bounded
            self.outbox.popitem(last=False)
            self.dropped += 1

    def take(self, wanted: Callable[[str], bool] | None = None) -> list[RequestTrace]:
        """Remove and return the finished traces whose id is `wanted` (all when None)."""
        keys = [key for key in self.outbox if wanted is None or wanted(key)]
        return [self.outbox.pop(key) for key in keys]
