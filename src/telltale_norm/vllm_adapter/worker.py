"""Worker-side patches: attach the runtime after model load, map each step's batch to
requests, free finished requests, and answer statistics RPCs.

Patched (each original kept as `<name>._telltale_original`):
- `GPUModelRunner.load_model` and `CPUModelRunner.load_model` (the CPU runner overrides it
  without calling `super()`): wrap decoder layers and create the runtime.
- `GPUModelRunner.execute_model`: release finished/aborted requests (vLLM reports them on the
  next step, which may schedule no tokens and return before the forward).
- `GPUModelRunner._model_forward`: runs inside the forward context with the final batch
  order; the step's token -> request mapping is built here, once per step.
- `WorkerBase`: the `RPC_METHODS` (`telltale_stats`, `telltale_traces`, ...) for
  `LLM.collective_rpc`.
Each is applied when vLLM imports the module, so only processes that use it pay for it.
"""

from __future__ import annotations

import atexit
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from telltale_norm.runtime import TelltaleRuntime
from telltale_norm.thresholds import calibration_record
from telltale_norm.vllm_adapter import state
from telltale_norm.vllm_adapter.frontend import engine_config
from telltale_norm.vllm_adapter.patching import on_import, patch_method
from telltale_norm.vllm_adapter.requests import external_request_id
from telltale_norm.vllm_adapter.layers import find_decoder_layers, wrap_decoder_layers
from telltale_norm.vllm_adapter.loop_layers import check_loop_layers

logger = logging.getLogger("vllm.telltale_norm")


def _after_load(original):
    def load_model(self, *args, **kwargs):
        original(self, *args, **kwargs)
        attach(self)

    return load_model


def attach(runner: Any) -> None:
    """Create the worker's runtime for `runner.model` and wrap its decoder layers."""
    config = engine_config(runner.vllm_config)
    if not config.active:
        return
    wrapped = wrap_decoder_layers(runner.model)
    num_layers = len(find_decoder_layers(runner.model))
    runtime = TelltaleRuntime(config, num_layers, runner.device,
                              max_len=runner.model_config.max_model_len)
    runner._telltale = runtime
    state.RUNTIME = runtime
    state.LAYERS.clear()
    state.LAYERS.update(wrapped)
    check_loop_layers(config, wrapped, runner.model_config.hf_text_config, num_layers)
    if config.stats_path:
        atexit.register(dump_stats, runtime, config.stats_path)
    compiled = runner.vllm_config.compilation_config.mode != 0
    logger.info(
        "telltale-norm: VLLM_PATCH=%s wrapped %d decoder layers of %s (default layers %s, "
        "tau %s, %s)", config.method, len(wrapped), type(runner.model).__name__,
        list(runtime.patched_layers),
        "fixed" if config.fixed_tau() else f"adaptive after {config.warmup_steps} steps",
        "compiled, op runs every step" if compiled else "eager")


def _execute_model(original):
    def execute_model(self, scheduler_output, *args, **kwargs):
        runtime: TelltaleRuntime | None = getattr(self, "_telltale", None)
        if runtime is None:
            return original(self, scheduler_output, *args, **kwargs)
        runtime.release(scheduler_output.finished_req_ids)
        self._telltale_scheduled = scheduler_output.num_scheduled_tokens
        try:
            return original(self, scheduler_output, *args, **kwargs)
        finally:
            self._telltale_scheduled = None
            runtime.end_step()

    return execute_model


def _model_forward(original):
    def model_forward(self, *args, **kwargs):
        runtime: TelltaleRuntime | None = getattr(self, "_telltale", None)
        scheduled = getattr(self, "_telltale_scheduled", None)
        if runtime is not None and scheduled is not None:
            batch = self.input_batch
            n = batch.num_reqs
            req_ids = batch.req_ids[:n]
            requests = self.requests

            def request_info(req_id: str):
                params = requests[req_id].sampling_params
                index = external_request_id(req_id)[1]
                if params is None:
                    return None, None, index
                return params.extra_args, params.seed, index

            runtime.begin_step(
                req_ids,
                np.fromiter((scheduled[r] for r in req_ids), dtype=np.int64, count=n),
                batch.num_computed_tokens_cpu[:n], batch.num_prompt_tokens[:n], request_info)
        try:
            return original(self, *args, **kwargs)
        finally:
            if runtime is not None:
                runtime.end_step()

    return model_forward


# ---------------------------------------------------------------- statistics RPCs
def _runtime_stats(runtime: TelltaleRuntime | None) -> dict[str, Any]:
    if runtime is None:
        return {"method": "off"}
    stats = runtime.snapshot()
    stats["rank"] = _rank()
    return stats


def _rank() -> int:
    try:
        from vllm.distributed import get_world_group

        return get_world_group().rank
    except Exception:  # noqa: BLE001 - no distributed group in this process
        return 0


def dump_stats(runtime: TelltaleRuntime | None, path: str) -> str:
    """Write the stats as JSON, or append one line to a `.jsonl` file. Returns the path."""
    rank = _rank()
    target = Path(path if rank == 0 else f"{path}.rank{rank}")
    target.parent.mkdir(parents=True, exist_ok=True)
    stats = _runtime_stats(runtime)
    if target.suffix == ".jsonl":
        with target.open("a") as f:
            f.write(json.dumps(stats) + "\n")
    else:
        target.write_text(json.dumps(stats, indent=2))
    return str(target)


def telltale_stats(self) -> dict[str, Any]:
    return _runtime_stats(state.RUNTIME)


def telltale_reset_stats(self) -> None:
    runtime = state.RUNTIME
    if runtime is not None:
        runtime.reset_stats()


def telltale_dump_stats(self, path: str | None = None) -> str | None:
    runtime = state.RUNTIME
    path = path or (runtime.config.stats_path if runtime else None)
    return dump_stats(runtime, path) if path else None


def telltale_traces(self, request_ids: list[str] | None = None) -> list[dict[str, Any]]:
    """Take the traces of finished traced requests whose caller's id is in `request_ids`
    (all waiting ones when None). Ids in the results are the caller's, with the candidate
    index of n > 1 requests."""
    runtime = state.RUNTIME
    if runtime is None:
        return []
    wanted = None if request_ids is None else set(request_ids)
    taken = runtime.traces.take(
        None if wanted is None else lambda key: external_request_id(key)[0] in wanted)
    out = []
    for trace in taken:
        request_id, index = external_request_id(trace.request_id)
        out.append({**trace.to_dict(), "request_id": request_id, "index": index})
    return out


def telltale_calibration(self, layers: list[int] | None = None) -> dict[str, Any]:
    """A statistics file (percentiles per layer) from the norms seen so far."""
    runtime = state.RUNTIME
    if runtime is None:
        return {"per_layer": {}}
    return calibration_record(runtime.quantiles, list(layers or runtime.patched_layers))


RPC_METHODS = (telltale_stats, telltale_reset_stats, telltale_dump_stats, telltale_traces,
               telltale_calibration)


def _patch_gpu_runner(module) -> None:
    cls = module.GPUModelRunner
    patch_method(cls, "load_model", _after_load)
    patch_method(cls, "execute_model", _execute_model)
    patch_method(cls, "_model_forward", _model_forward)


def _patch_cpu_runner(module) -> None:
    # The CPU runner inherits the rest, but overrides load_model without calling super().
    patch_method(module.CPUModelRunner, "load_model", _after_load)


def _add_rpc_methods(module) -> None:
    for method in RPC_METHODS:
        setattr(module.WorkerBase, method.__name__, method)


def install() -> None:
    """Install the worker-side patches in the processes that import the model runners."""
    on_import("vllm.v1.worker.gpu_model_runner", _patch_gpu_runner)
    on_import("vllm.v1.worker.cpu_model_runner", _patch_cpu_runner)
    on_import("vllm.v1.worker.worker_base", _add_rpc_methods)
