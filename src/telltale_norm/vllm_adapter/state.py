"""The worker process's telltale runtime (one model per worker process)."""

from __future__ import annotations

from telltale_norm.runtime import TelltaleRuntime

RUNTIME: TelltaleRuntime | None = None
