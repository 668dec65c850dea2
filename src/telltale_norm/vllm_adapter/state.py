"""The worker process's telltale runtime (one model per worker process)."""

from __future__ import annotations

from torch import nn

from telltale_norm.runtime import TelltaleRuntime

RUNTIME: TelltaleRuntime | None = None
LAYERS: dict[int, nn.Module] = {}  # wrapped decoder layers by index (re-run by loop)
DP_RANK = 0  # this worker's data-parallel engine
