"""telltale-norm: the l2 norm of late-layer hidden states, acted on inside vLLM.

Switch a method on with environment variables (`VLLM_PATCH=loop`, see SPEC.md) and change no
code, or configure it from Python before creating an engine:

    import telltale_norm
    telltale_norm.configure(method="suppress", layers=[21, 22], tau={21: 1300, 22: 1550})
    llm = vllm.LLM(model=...)
    ...
    print(telltale_norm.stats(llm))
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

from telltale_norm.traces import RequestTrace
from telltale_norm.config import (
    REQUEST_KEYS,
    SETTINGS,
    SETTINGS_BY_FIELD,
    ConfigError,
    TelltaleConfig,
)

__all__ = ["ConfigError", "RequestTrace", "TelltaleConfig", "calibration", "configure",
           "reset_stats", "stats", "traces"]
__version__ = "0.1.0"
STATS_ROUTE = "/telltale/stats"  # served with VLLM_PLUGINS=telltale_norm (vllm_adapter/server.py)


def configure(method: str, layers: Iterable[int] | None = None,
              tau: Mapping[int, float] | None = None, **settings: Any) -> TelltaleConfig:
    """Set the method and its settings for every engine created afterwards in this process
    and the processes it starts. Replaces all telltale variables of this process.

    `settings` are config field names (`loop_max_extra=2`, `suppress_mode="random"`) or
    request-key names without the prefix (`max_extra=2`). Validated by the same rules as
    the environment; raises `ConfigError` naming the bad setting.
    """
    env = {"VLLM_PATCH": str(method)}
    if layers is not None:
        env["PATCHED_LAYERS"] = ",".join(str(int(layer)) for layer in layers)
    if tau is not None:
        env["PATCHED_TAU_JSON"] = json.dumps({str(k): v for k, v in tau.items()})
    for name, value in settings.items():
        setting = SETTINGS_BY_FIELD.get(name) or REQUEST_KEYS.get("telltale_" + name)
        if setting is None:
            raise ConfigError(f"configure(): unknown setting {name}={value!r}; allowed: "
                              + ", ".join(s.field for s in SETTINGS))
        env[setting.env] = "1" if value is True else "0" if value is False else str(value)
    merged = {k: v for k, v in os.environ.items() if k not in {s.env for s in SETTINGS}}
    config = TelltaleConfig.from_env({**merged, **env})
    for setting in SETTINGS:
        os.environ.pop(setting.env, None)
    os.environ.update(env)
    from telltale_norm.vllm_adapter.plugin import register

    register()
    return config


def _engine_is_patched(llm: Any) -> bool:
    from telltale_norm.vllm_adapter.frontend import CONFIG_KEY

    return CONFIG_KEY in (llm.llm_engine.vllm_config.additional_config or {})


def stats(llm: Any, all_ranks: bool = False) -> dict[str, Any] | list[dict[str, Any]]:
    """Statistics of a `vllm.LLM`'s workers: steps, per-layer counts, norm quartiles, tau.

    `llm` may also be a server's URL (`"http://127.0.0.1:8000"`, a server started with
    `VLLM_PLUGINS=telltale_norm`): its `GET /telltale/stats` lists every worker of every
    data-parallel engine (each dict has its `dp_rank` and `rank`).
    Returns the first worker's dict (rank 0 of engine 0), or one dict per worker with
    `all_ranks=True`.
    """
    if isinstance(llm, str):
        per_rank = _server_stats(llm)
    elif not _engine_is_patched(llm):
        per_rank = [{"method": "off"}]  # VLLM_PATCH was off: the engine runs unpatched
    else:
        per_rank = llm.collective_rpc("telltale_stats")
    return per_rank if all_ranks else per_rank[0]


def _server_stats(url: str, timeout: float = 30.0) -> list[dict[str, Any]]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url.rstrip("/") + STATS_ROUTE, timeout=timeout) as reply:
            return json.loads(reply.read())
    except urllib.error.HTTPError as err:
        if err.code == 404:
            raise RuntimeError(
                f"{url} has no {STATS_ROUTE}: start the server with VLLM_PLUGINS=telltale_norm "
                "(vLLM serves plugin routes only when VLLM_PLUGINS names them)") from None
        raise


def reset_stats(llm: Any) -> None:
    """Zero the counters and norm statistics of every worker of `llm`."""
    llm.collective_rpc("telltale_reset_stats")


def traces(llm: Any) -> list[RequestTrace]:
    """Take the norm traces of finished traced requests (`telltale_trace=1`; rerank ones
    include their scores).

    Each trace's `request_id` is the caller's id (`RequestOutput.request_id`) and `index`
    the candidate (`CompletionOutput.index`) for `n > 1`. Taken traces leave the worker.
    """
    if not _engine_is_patched(llm):
        return []
    return [RequestTrace.from_dict(data) for data in llm.collective_rpc("telltale_traces")[0]]


def calibration(llm: Any, layers: Iterable[int] | None = None) -> dict[str, Any]:
    """A statistics file's content (per-layer percentiles p1..p99 of the decode norms seen
    so far), for `VLLM_PATCH_STATE_PATH`."""
    if not _engine_is_patched(llm):
        return {"per_layer": {}}
    return llm.collective_rpc("telltale_calibration",
                              args=(None if layers is None else list(layers),))[0]
