"""Per-request settings and state, keyed by request id, stored in slot-indexed tables.

Every live request owns one of a fixed number of slots (the engine's `max_num_seqs`), plus
one spare *null* slot that padding tokens point at: it is never admitted, so its method is
`off` and writes aimed at it are harmless. A request's settings (method, hyperparameters,
per-layer tau, layer mask and random keys) are written once on the host when it is
admitted; each step's tokens take theirs to the device (`batch.StepBuffers`). Each method
keeps its own per-request state in device buffers registered here. Every device tensor is allocated once, at a
fixed address, before vLLM sizes its KV cache: nothing grows under load, and compiled
graphs and CUDA graphs can keep pointing at them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from telltale_norm import rng
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
OFF = METHOD_ID["off"]
ACTING = frozenset(METHOD_ID[m] for m in ("suppress", "loop", "ttts"))  # act on tau


@dataclass(frozen=True)
class RequestRow:
    """What a request's config contributes to the tables (built once per request)."""

    method: int
    params: np.ndarray  # float32 [len(PARAM_COLUMNS)]
    tau: np.ndarray  # float32 [num_layers], NaN = adaptive
    layers: np.ndarray  # bool [num_layers]
    rng_key: np.ndarray  # int64 [num_layers]: `rng.layer_key` of its seed and stream
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
    stream = rng.STREAM_TTTS if cfg.method == "ttts" else rng.STREAM_SUPPRESS
    rng_key = rng.layer_key(np.int64(seed), stream, np.arange(num_layers, dtype=np.int64))
    return RequestRow(METHOD_ID[cfg.method], params, tau, layers, rng_key,
                      trace=cfg.trace or cfg.method == "rerank")


class RequestStates:
    """Slot store of live requests: settings tables (on the host) plus per-method state
    buffers (on the device), all of `capacity + 1` rows (the last is the null slot)."""

    def __init__(self, num_layers: int, capacity: int, device: torch.device | str = "cpu"
                 ) -> None:
        self.num_layers = num_layers
        self.capacity = capacity
        self.null_slot = capacity
        self.device = torch.device(device)
        self._slots: dict[str, int] = {}
        self._free = list(range(capacity - 1, -1, -1))
        self._admitted: list[int] = []  # slots whose state is not reset yet (see `sync`)
        self.version = 0  # counts admissions and releases (the settings tables changed)
        rows = capacity + 1
        # settings tables, read by per-step decisions and gathered per token for the device
        self.method = np.full(rows, OFF, dtype=np.int64)
        self.params = np.zeros((rows, len(PARAM_COLUMNS)), dtype=np.float32)
        self.tau = np.full((rows, num_layers), math.nan, dtype=np.float32)
        self.layers = np.zeros((rows, num_layers), dtype=bool)  # acts on the layer (not off)
        self.rng_key = np.zeros((rows, num_layers), dtype=np.int64)  # of seed, stream, layer
        # host-only bookkeeping
        self.high_water = np.full(rows, -1, dtype=np.int64)
        self.prompt_len = np.zeros(rows, dtype=np.int64)
        self.traced = np.zeros(rows, dtype=bool)
        # name -> (tensor [rows, *shape], fill value) of per-method state
        self._buffers: dict[str, tuple[torch.Tensor, float]] = {}

    # ------------------------------------------------------------ buffers
    def register_buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype,
                        fill: float = 0) -> torch.Tensor:
        """Add a per-slot state tensor `[capacity + 1, *shape]`, reset to `fill` on
        admission."""
        tensor = torch.full((self.capacity + 1, *shape), fill, dtype=dtype, device=self.device)
        self._buffers[name] = (tensor, fill)
        return tensor

    def buffer(self, name: str) -> torch.Tensor:
        return self._buffers[name][0]

    def nbytes(self) -> int:
        """Device bytes of every registered buffer."""
        return sum(t.numel() * t.element_size() for t, _ in self._buffers.values())

    # ------------------------------------------------------------ lifecycle
    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, req_id: str) -> bool:
        return req_id in self._slots

    def live_slots(self) -> list[int]:
        return list(self._slots.values())

    def slot(self, req_id: str) -> int | None:
        return self._slots.get(req_id)

    def admit(self, req_id: str, row: RequestRow, prompt_len: int) -> int | None:
        """Give `req_id` a slot holding `row` (None when every slot is taken)."""
        if not self._free:
            return None
        slot = self._free.pop()
        self._slots[req_id] = slot
        self.method[slot] = row.method
        self.params[slot] = row.params
        self.tau[slot] = row.tau
        self.layers[slot] = row.layers & (row.method != OFF)
        self.rng_key[slot] = row.rng_key
        self.high_water[slot] = -1
        self.prompt_len[slot] = prompt_len
        self.traced[slot] = row.trace and row.method != OFF
        self._admitted.append(slot)
        self.version += 1
        return slot

    def release(self, req_id: str) -> int | None:
        """Free the slot of `req_id` (no-op for unknown ids); returns the freed slot. Its
        state is left as it is: no token points at a free slot."""
        slot = self._slots.pop(req_id, None)
        if slot is not None:
            self.method[slot] = OFF
            self.layers[slot] = False
            self.traced[slot] = False
            self._free.append(slot)
            self.version += 1
        return slot

    def sync(self) -> None:
        """Reset the state of the slots admitted since the last call: one fill per buffer,
        once per step at most."""
        if not self._admitted:
            return
        # pinned on CUDA: a queued copy, which a copy from pageable memory may not be
        slots = torch.tensor(self._admitted, dtype=torch.int64,
                             pin_memory=self.device.type == "cuda")
        slots = slots.to(self.device, non_blocking=True)
        for tensor, fill in self._buffers.values():
            tensor.index_fill_(0, slots, fill)
        self._admitted.clear()
