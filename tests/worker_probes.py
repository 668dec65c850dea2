"""Worker-side probes of how a wrapped decoder layer is called (for `LLM.collective_rpc`).

`record_calls` makes a layer's unwrapped forward log every call; `call_report` compares each
re-run (a call made while the layer's KV slot-mapping entry is hidden) with the first pass
before it: a re-run must get every argument the first pass got, the same values, with only
`hidden_states` and `residual` replaced. Under torch.compile the first pass is part of the
traced graph and is not logged: the report then checks the re-runs' `llama_4_scaling`
(DeepSeek) against its definition from the positions instead.
"""

from __future__ import annotations

import inspect
import math

import torch

_REPLACED = ("hidden_states", "residual")


def _layer(index: int):
    from telltale_norm.vllm_adapter import state

    return state.LAYERS[index]


def _named(layer, args: tuple, kwargs: dict) -> dict:
    """A call's arguments by parameter name; tensors copied (vLLM reuses its input buffers,
    e.g. `positions`, from step to step)."""
    params = list(inspect.signature(layer._telltale_probe_original).parameters)
    named = {**dict(zip(params, args)), **kwargs}
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in named.items()}


def record_calls(worker, index: int) -> bool:
    from vllm.forward_context import get_forward_context

    layer = _layer(index)
    original = layer._telltale_probe_original = layer._telltale_original_forward
    calls = layer._telltale_probe_calls = []

    def recording(*args, **kwargs):
        slots = get_forward_context().slot_mapping
        rerun = not any(name in slots for name in layer._telltale_attention_names)
        calls.append((rerun, _named(layer, args, kwargs)))
        return original(*args, **kwargs)

    layer._telltale_original_forward = recording
    return True


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and torch.equal(a, b)
    return a is b or a == b


def _llama_4_error(worker, call: dict) -> float:
    """Largest deviation of a call's llama_4_scaling from its definition (vLLM's DeepSeek:
    1 + beta * log(1 + floor(position / original_max_position_embeddings)))."""
    cfg = worker.model_runner.model_config.hf_config.llama_4_scaling
    pos = call["positions"].double()
    want = 1 + cfg["beta"] * torch.log1p(torch.floor(pos / cfg["original_max_position_embeddings"]))
    got = call["llama_4_scaling"]
    if got is None or got.shape != (pos.shape[0], 1, 1):
        return math.inf
    return float((got.double().flatten() - want).abs().max())


def call_report(worker, index: int) -> dict:
    """Stop recording; summarise the re-runs (see the module docstring)."""
    layer = _layer(index)
    layer._telltale_original_forward = layer._telltale_probe_original
    calls = layer._telltale_probe_calls
    report = {"first_passes": 0, "reruns": 0, "mismatches": [], "extras": {},
              "llama_4_error": 0.0, "llama_4_values": set()}
    previous = None
    for rerun, call in calls:
        if not rerun:
            report["first_passes"] += 1
            previous = call
            continue
        report["reruns"] += 1
        report["extras"] = {k: type(v).__name__ for k, v in call.items() if k not in _REPLACED
                            and k != "positions"}
        if "llama_4_scaling" in call:
            report["llama_4_error"] = max(report["llama_4_error"], _llama_4_error(worker, call))
            report["llama_4_values"] |= set(call["llama_4_scaling"].flatten().tolist())
        if previous is None:
            continue  # compiled: the first pass ran inside the graph
        if previous.keys() != call.keys():
            report["mismatches"].append(f"keys {sorted(previous)} != {sorted(call)}")
        report["mismatches"] += [name for name in call if name not in _REPLACED
                                 and not _same(previous.get(name), call[name])]
    report["llama_4_values"] = len(report["llama_4_values"])  # distinct values seen
    return report


# ---------------------------------------------------------------- KV cache writes
def _impls(index: int) -> list:
    from telltale_norm.vllm_adapter.rerun import cache_modules

    return [m.impl for m in cache_modules(_layer(index))]


def log_kv_writes(worker, index: int) -> int:
    """Make the attention backends of layer `index` log the slots (>= 0) each K/V write
    fills (`do_kv_cache_update`, of Attention and MLA backends alike)."""
    impls = _impls(index)
    for impl in impls:
        original = type(impl).do_kv_cache_update.__get__(impl)
        log = impl._telltale_probe_log = []

        def logged(*args, _original=original, _log=log, **kwargs):
            slots = inspect.signature(_original).bind(*args, **kwargs).arguments["slot_mapping"]
            _log.append(slots[slots >= 0].clone())
            return _original(*args, **kwargs)

        impl.do_kv_cache_update = logged
    return len(impls)


def take_kv_writes(worker, index: int) -> list[int]:
    """Stop logging; every slot written since `log_kv_writes`, in order."""
    slots = []
    for impl in _impls(index):
        slots += [s for call in impl.__dict__.pop("_telltale_probe_log") for s in call.tolist()]
        del impl.do_kv_cache_update
    return slots


def leaky_reruns(worker, on: bool) -> bool:
    """Negative control: re-runs that leave the slot mapping in place (and so write K/V)."""
    from telltale_norm.vllm_adapter import op, rerun

    op.rerun_layer = rerun.call_layer if on else rerun.rerun_layer
    return True
