"""Per-request settings and state, keyed by request id, stored in slot-indexed tensors.

Every live request owns one slot. Its settings (method, hyperparameters, per-layer tau and
layer mask, seed) are written once when it is admitted; each method keeps its own per-request
state in buffers registered here, which grow with the pool and are reset on admission. A step
then only needs one index tensor (token -> slot) to gather everything per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from telltale_norm.config import METHODS, TelltaleConfig

# Columns of the per-request float parameter table, in one place.
PARAM_COLUMNS = (
    "warmup_steps", "iqr_k", "min_iqr", "tau_floor",
    "loop_max_extra", "loop_growth_eps", "loop_blowup", "loop_alpha",
    "ttts_low_k", "ttts_gamma", "ttts_p_inject", "ttts_beta", "ttts_cooldown", "ttts_cos_min",
    "ttts_bank_k",
    "suppress_random", "suppress_clamp", "suppress_mul_scale", "suppress_clamp_div",
    "suppress_only_decode", "suppress_p",
)
COL = {name: i for i, name in enumerate(PARAM_COLUMNS)}
METHOD_ID = {name: i for i, name in enumerate(METHODS)}


@dataclass(frozen=True)
class RequestRow:
    """What a request's config contributes to the tables (built once per request)."""

    method: int
    params: np.ndarray  # float32 [len(PARAM_COLUMNS)]
    tau: np.ndarray  # float32 [num_layers], NaN = adaptive
    layers: np.ndarray  # bool [num_layers]
    seed: int
    trace: bool


def request_row(cfg: TelltaleConfig, num_layers: int, seed: int) -> RequestRow:
    """Encode a (validated) request config for a `num_layers`-layer model."""
    p = cfg.random_suppress_p
    if cfg.random_suppress_k_per_response > 0:
        p = min(1.0, cfg.random_suppress_k_per_response / cfg.est_avg_decode_len)
    values = {
        "warmup_steps": cfg.warmup_steps, "iqr_k": cfg.adaptive_iqr_k,
        "min_iqr": cfg.adaptive_min_iqr, "tau_floor": cfg.adaptive_tau_floor,
        "loop_max_extra": cfg.loop_max_extra, "loop_growth_eps": cfg.loop_growth_eps,
        "loop_blowup": cfg.loop_blowup, "loop_alpha": cfg.loop_alpha,
        "ttts_low_k": cfg.ttts_low_k, "ttts_gamma": cfg.ttts_gamma,
        "ttts_p_inject": cfg.ttts_p_inject, "ttts_beta": cfg.ttts_beta,
        "ttts_cooldown": cfg.ttts_cooldown, "ttts_cos_min": cfg.ttts_cos_min,
        "ttts_bank_k": cfg.ttts_bank_k,
        "suppress_random": cfg.suppress_mode == "random",
        "suppress_clamp": cfg.suppress_action == "clamp",
        "suppress_mul_scale": cfg.suppress_mul_scale,
        "suppress_clamp_div": cfg.suppress_clamp_div,
        "suppress_only_decode": cfg.suppress_only_decode, "suppress_p": p,
    }
    params = np.array([float(values[c]) for c in PARAM_COLUMNS], dtype=np.float32)
    tau = np.full(num_layers, math.nan, dtype=np.float32)
    for layer, value in cfg.fixed_tau().items():
        if 0 <= layer < num_layers:
            tau[layer] = value
    layers = np.zeros(num_layers, dtype=bool)
    layers[list(cfg.patched_layers(num_layers))] = True
    return RequestRow(METHOD_ID[cfg.method], params, tau, layers, seed,
                      trace=cfg.trace or cfg.method == "rerank")


class RequestStates:
    """Slot store of live requests: settings tables plus per-method state buffers."""

    def __init__(self, num_layers: int, device: torch.device | str = "cpu",
                 capacity: int = 64) -> None:
        self.num_layers = num_layers
        self.device = torch.device(device)
        self._slots: dict[str, int] = {}
        self._free: list[int] = []
        self.capacity = 0
        # name -> (tensor [capacity, *shape], fill value)
        self._buffers: dict[str, tuple[torch.Tensor, float]] = {}
        self.method = np.zeros(0, dtype=np.int64)  # host copies for per-step decisions
        self.layers_host = np.zeros((0, num_layers), dtype=bool)
        self.adaptive_host = np.zeros((0, num_layers), dtype=bool)  # patched, tau not fixed
        self.high_water = np.zeros(0, dtype=np.int64)
        self.prompt_len = np.zeros(0, dtype=np.int64)
        self.traced = np.zeros(0, dtype=bool)
        self.random_suppress = np.zeros(0, dtype=bool)  # suppress in random mode: draws
        self.register_buffer("params", (len(PARAM_COLUMNS),), torch.float32)
        self.register_buffer("tau", (num_layers,), torch.float32, math.nan)
        self.register_buffer("layers", (num_layers,), torch.bool)
        self.register_buffer("seed", (), torch.int64)
        self._grow(capacity)

    # ------------------------------------------------------------ buffers
    def register_buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype,
                        fill: float = 0) -> torch.Tensor:
        """Add a per-slot state tensor `[capacity, *shape]`, reset to `fill` on admission."""
        if name not in self._buffers:
            tensor = torch.full((self.capacity, *shape), fill, dtype=dtype, device=self.device)
            self._buffers[name] = (tensor, fill)
        return self._buffers[name][0]

    def buffer(self, name: str) -> torch.Tensor:
        return self._buffers[name][0]

    def buffer_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t, _ in self._buffers.values())

    def _grow(self, capacity: int) -> None:
        old = self.capacity
        for name, (tensor, fill) in self._buffers.items():
            bigger = torch.full((capacity, *tensor.shape[1:]), fill, dtype=tensor.dtype,
                                device=self.device)
            bigger[:old] = tensor
            self._buffers[name] = (bigger, fill)
        self.method = np.concatenate([self.method, np.zeros(capacity - old, dtype=np.int64)])
        self.layers_host = np.concatenate(
            [self.layers_host, np.zeros((capacity - old, self.num_layers), dtype=bool)])
        self.adaptive_host = np.concatenate(
            [self.adaptive_host, np.zeros((capacity - old, self.num_layers), dtype=bool)])
        self.high_water = np.concatenate(
            [self.high_water, np.full(capacity - old, -1, dtype=np.int64)])
        self.prompt_len = np.concatenate([self.prompt_len, np.zeros(capacity - old, np.int64)])
        self.traced = np.concatenate([self.traced, np.zeros(capacity - old, dtype=bool)])
        self.random_suppress = np.concatenate(
            [self.random_suppress, np.zeros(capacity - old, dtype=bool)])
        self._free.extend(range(capacity - 1, old - 1, -1))
        self.capacity = capacity

    # ------------------------------------------------------------ lifecycle
    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, req_id: str) -> bool:
        return req_id in self._slots

    def live_methods(self) -> np.ndarray:
        """The method id of every live request."""
        return self.method[list(self._slots.values())]

    def slot(self, req_id: str) -> int | None:
        return self._slots.get(req_id)

    def admit(self, req_id: str, row: RequestRow, prompt_len: int) -> int:
        """Give `req_id` a slot holding `row`, with every state buffer reset."""
        if not self._free:
            self._grow(self.capacity * 2)
        slot = self._free.pop()
        self._slots[req_id] = slot
        for tensor, fill in self._buffers.values():
            tensor[slot].fill_(fill)
        self.buffer("params")[slot] = torch.from_numpy(row.params).to(self.device)
        self.buffer("tau")[slot] = torch.from_numpy(row.tau).to(self.device)
        self.buffer("layers")[slot] = torch.from_numpy(row.layers).to(self.device)
        self.buffer("seed")[slot] = row.seed
        self.method[slot] = row.method
        self.layers_host[slot] = row.layers & (row.method != METHOD_ID["off"])
        self.adaptive_host[slot] = self.layers_host[slot] & np.isnan(row.tau)
        self.high_water[slot] = -1
        self.prompt_len[slot] = prompt_len
        self.traced[slot] = row.trace and row.method != METHOD_ID["off"]
        self.random_suppress[slot] = (row.method == METHOD_ID["suppress"]
                                      and row.params[COL["suppress_random"]] > 0)
        return slot

    def release(self, req_id: str) -> int | None:
        """Free the slot of `req_id` (no-op for unknown ids); returns the freed slot."""
        slot = self._slots.pop(req_id, None)
        if slot is not None:
            self.method[slot] = METHOD_ID["off"]
            self.layers_host[slot] = False
            self.adaptive_host[slot] = False
            self.traced[slot] = False
            self.random_suppress[slot] = False
            self._free.append(slot)
        return slot
