"""What an engine's deployment settings mean for the plugin: adapt them, or refuse them.

A default GPU engine differs from the CPU one where it matters to telltale-norm (async
scheduling, full CUDA graphs, Model Runner V2, ...). Each setting here either works as the
plugin needs after a logged adjustment, or stops the engine at start with a message naming
the setting and what to change. Nothing runs with wrong numbers and no word.

`prepare` runs on the `EngineArgs` before vLLM builds its config; `adapt` on the built
`VllmConfig`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from telltale_norm.vllm_adapter import internals

logger = logging.getLogger("vllm.telltale_norm")


class UnsupportedDeploymentError(ValueError):
    """An engine setting the plugin cannot run under correctly."""


def _refuse(what: str, why: str, fix: str) -> UnsupportedDeploymentError:
    return UnsupportedDeploymentError(
        f"telltale-norm cannot run with {what}: {why}. {fix}, or unset VLLM_PATCH to run "
        "vLLM without telltale-norm.")


def prepare(args: Any) -> None:
    """Check and adjust `EngineArgs` (in place) before vLLM builds the engine config."""
    if args.speculative_config:
        raise _refuse(
            f"speculative decoding (speculative_config={args.speculative_config!r})",
            "draft tokens run through the layers like decode tokens, and rejected ones "
            "would be observed, counted, edited and scored", "Remove --speculative-config")
    if args.async_scheduling:
        raise _refuse(
            "async scheduling (--async-scheduling / async_scheduling=True)",
            "it schedules one more step after a request stops, whose token vLLM discards "
            "but the plugin would count, trace and score",
            "Remove it (the plugin turns async scheduling off when it is not asked for)")
    if args.async_scheduling is None:
        args.async_scheduling = False  # vLLM's default on GPU would be True
        if _gpu():
            logger.info("telltale-norm: async scheduling off, so every token the plugin "
                        "observes is one the caller receives (costs vLLM's overlap of "
                        "scheduling with the forward; docs/DEPLOYMENT.md)")
    if args.enable_dbo or args.ubatch_size > 1:
        raise _refuse(
            f"micro-batching (enable_dbo={args.enable_dbo}, ubatch_size={args.ubatch_size})",
            "a micro-batch's tokens are not the step's tokens the plugin maps to requests",
            "Remove --enable-dbo / --ubatch-size")
    if os.environ.get("VLLM_USE_RUST_FRONTEND", "0").strip() not in ("", "0"):
        raise _refuse(
            "the Rust frontend (VLLM_USE_RUST_FRONTEND=1)",
            "it serves HTTP without the Python request validation and response annotations "
            "the plugin adds", "Unset VLLM_USE_RUST_FRONTEND")
    _refuse_model_runner_v2(_v2_causes(args.watermark_config is not None, False))
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER") is None:
        # Model Runner V2 (the GPU default) keeps no per-request extra_args and replays
        # full CUDA graphs without a forward context: telltale-norm needs V1.
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"


def _v2_causes(watermark: bool, hisparse: bool) -> list[str]:
    """The settings that select Model Runner V2."""
    return [cause for cause, on in (
        ("VLLM_USE_V2_MODEL_RUNNER=1",
         os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "").strip().lower() in ("1", "true")),
        ("watermark_config", watermark), ("hisparse_config", hisparse)) if on]


def _refuse_model_runner_v2(causes: list[str]) -> None:
    if causes:
        raise _refuse(
            f"Model Runner V2 (selected by {' and '.join(causes)})",
            "it keeps no per-request extra_args and replays CUDA graphs without the forward "
            "context the plugin reads",
            f"Remove {' and '.join(causes)} (the plugin selects the V1 runner itself)")


def adapt(vllm_config: Any, loop_possible: bool, cuda: bool | None = None) -> None:
    """Check the built engine config. Where loop is possible, keep its op out of CUDA
    graphs on CUDA (elsewhere the plugin's step is graph-safe and CUDA graphs stay as they
    are). `cuda` defaults to the platform vLLM detected (tests pass True for the GPU path)."""
    cuda = _gpu() if cuda is None else cuda
    if vllm_config.use_v2_model_runner:
        _refuse_model_runner_v2(_v2_causes(
            getattr(vllm_config, "watermark_config", None) is not None,
            getattr(vllm_config.attention_config, "hisparse_config", None) is not None)
            or ["vLLM's own choice"])
    parallel = vllm_config.parallel_config
    if parallel.use_sequence_parallel_moe:
        raise _refuse(
            f"sequence-parallel MoE (all2all_backend={parallel.all2all_backend} with expert "
            "parallel, TP > 1 and DP > 1)",
            "each rank's layer outputs hold only a slice of the step's tokens",
            "Use another --all2all-backend or no expert parallel")
    if cuda and loop_possible:
        _keep_op_out_of_cuda_graphs(vllm_config.compilation_config)


def _keep_op_out_of_cuda_graphs(cc: Any) -> None:
    from telltale_norm.vllm_adapter.op import OP_NAME

    CompilationMode = internals.require("CompilationMode")  # noqa: N806 - vLLM's enums
    CUDAGraphMode = internals.require("CUDAGraphMode")  # noqa: N806

    if cc.cudagraph_mode == CUDAGraphMode.NONE:
        return  # nothing is replayed: the op runs every step
    if cc.mode != CompilationMode.VLLM_COMPILE:
        raise _refuse(
            f"loop and CUDA graphs (cudagraph_mode={cc.cudagraph_mode.name}) without vLLM's "
            f"compilation (mode={cc.mode.name}; set by -cc.mode, VLLM_USE_BREAKABLE_CUDAGRAPH=1 "
            "(vLLM turns it on for some models), VLLM_BATCH_INVARIANT=1 or "
            "TORCH_COMPILE_DISABLE=1)",
            "the graph would be cut only at vLLM's attention ops and replay without running "
            "loop's re-runs", "Set VLLM_USE_BREAKABLE_CUDAGRAPH=0 and keep the default "
            "compilation, disable CUDA graphs (-cc.cudagraph_mode=NONE / enforce_eager), or "
            "start the engine without loop (no VLLM_PATCH=loop, no TELLTALE_ALLOW_LOOP=1)")
    if not cc.splitting_ops:
        raise _refuse(
            f"loop and splitting_ops={cc.splitting_ops!r}",
            "a graph cut nowhere replays without running loop's re-runs",
            "Keep vLLM's default splitting_ops (the plugin adds its op to them), or start the "
            "engine without loop")
    # Loop's op must run as Python every step: split the graph at it (keeping vLLM's own
    # splitting ops) and capture piecewise CUDA graphs only, since a full graph replays
    # without running any Python.
    if OP_NAME not in cc.splitting_ops:
        cc.splitting_ops.append(OP_NAME)
    if cc.cudagraph_mode != CUDAGraphMode.PIECEWISE:
        logger.info("telltale-norm: CUDA graphs %s -> PIECEWISE so %s runs every step",
                    cc.cudagraph_mode.name, OP_NAME)
        cc.cudagraph_mode = CUDAGraphMode.PIECEWISE


def _gpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cuda_alike()
