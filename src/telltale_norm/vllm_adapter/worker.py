"""Worker-side patches: attach the runtime after model load, map each step's batch to
requests, free finished requests, and answer statistics RPCs.

Patched (each original kept as `<name>._telltale_original`):
- `GPUModelRunner.load_model` and `CPUModelRunner.load_model` (the CPU runner overrides it
  without calling `super()`): wrap decoder layers and create the runtime.
- `GPUModelRunner.execute_model`: release finished/aborted requests (vLLM reports them on the
  next step, which may schedule no tokens and return before the forward).
- `GPUModelRunner._model_forward`: runs inside the forward context with the final batch
  order; the step's token -> request mapping is built here, once per step.
- `GPUModelRunner.sample_tokens`: after the step's output is built (and vLLM synchronised),
  rerank rows ride on it to the engine core (`engine_core.py`).
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

from telltale_norm.methods.loop import Agree, union_over
from telltale_norm.runtime import TelltaleRuntime
from telltale_norm.thresholds import calibration_record
from telltale_norm.vllm_adapter import engine_core, internals, state
from telltale_norm.vllm_adapter.frontend import engine_config
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
    for name in ("SchedulerOutput", "CachedRequestState", "InputBatch", "ForwardContext"):
        internals.require(name)
    num_layers = len(find_decoder_layers(runner.model))
    wrapped = wrap_decoder_layers(runner.model, config.patched_layers(num_layers),
                                  loop=config.loop_possible)
    model_config, scheduler = runner.model_config, runner.vllm_config.scheduler_config
    # Every buffer is allocated here, after the weights and before vLLM measures the memory
    # left for its KV cache, so the cache is sized around them.
    runtime = TelltaleRuntime(
        config, num_layers, model_config.get_hidden_size(), runner.device, model_config.dtype,
        max_num_seqs=scheduler.max_num_seqs, max_num_tokens=scheduler.max_num_batched_tokens,
        max_len=model_config.max_model_len, agree=_tensor_parallel_agreement())
    runtime.owned_layers = frozenset(index for index, _ in wrapped)  # this pipeline stage's
    runner._telltale = runtime
    # data_parallel_rank reads 0 in engines vLLM runs as independent ones (dense models)
    internals.require("ParallelConfig")
    state.DP_RANK = runner.vllm_config.parallel_config.data_parallel_index
    state.RUNTIME = runtime
    state.LAYERS.clear()
    state.LAYERS.update(wrapped)
    check_loop_layers(config, wrapped, runner.model_config.hf_text_config, num_layers)
    if config.stats_path:
        atexit.register(dump_stats, runtime, config.stats_path)
    compiled = runner.vllm_config.compilation_config.mode != 0
    tau = "fixed" if config.fixed_tau() else f"adaptive after {config.warmup_steps} steps"
    mode = ("loop possible: the op runs every step" if config.loop_possible
            else "the step is traced into the graph") if compiled else "eager"
    runtime.start_line = (
        f"telltale-norm: VLLM_PATCH={config.method} wrapped {len(wrapped)} decoder layers of "
        f"{type(runner.model).__name__} (layers {list(runtime.patched_layers)}, tau {tau}, "
        f"{'compiled, ' if compiled else ''}{mode})")
    logger.info("%s", runtime.start_line)


def _tensor_parallel_agreement() -> Agree | None:
    """With tensor parallel, loop's re-run decisions are agreed on over the ranks."""
    group = internals.require("get_tp_group")()
    return union_over(group.device_group) if group.world_size > 1 else None


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


def _sample_tokens(original):
    def sample_tokens(self, *args, **kwargs):
        output = original(self, *args, **kwargs)
        runtime: TelltaleRuntime | None = getattr(self, "_telltale", None)
        return output if runtime is None else engine_core.attach_push(runtime, output)

    return sample_tokens


# ---------------------------------------------------------------- statistics RPCs
def _runtime_stats(runtime: TelltaleRuntime | None) -> dict[str, Any]:
    if runtime is None:
        return {"method": "off"}
    stats = runtime.snapshot()
    stats["rank"] = _rank()
    stats["dp_rank"] = state.DP_RANK
    return stats


def _rank() -> int:
    try:
        return internals.require("get_world_group")().rank
    except AssertionError:  # noqa: BLE001 - no distributed group in this process
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


def _add_rpc_methods(worker_base: type) -> None:
    for method in RPC_METHODS:
        setattr(worker_base, method.__name__, method)


def install() -> None:
    """Install the worker-side patches in the processes that import the model runners."""
    internals.patch("GPUModelRunner.load_model", _after_load)
    internals.patch("GPUModelRunner.execute_model", _execute_model)
    internals.patch("GPUModelRunner._model_forward", _model_forward)
    internals.patch("GPUModelRunner.sample_tokens", _sample_tokens)
    # The CPU runner inherits the rest, but overrides load_model without calling super().
    internals.patch("CPUModelRunner.load_model", _after_load)
    internals.when_imported("WorkerBase", _add_rpc_methods)
