"""`telltale::layer_step`: loop's opaque custom op, at the patched layers loop may re-run.

vLLM compiles the model and traces it once, so Python inside a layer would run only during the
trace. The graph-safe step of every method is traced into the graph (layers.py); loop's
re-runs depend on data and need Python. A custom op stays opaque to the compiler: its Python
body runs on every step, after the traced step, and re-runs the layer in place where the
step's `gate` (norms, and tau where a token enters loop's window) says so. On CUDA the op
is added to vLLM's splitting ops, so CUDA graphs are captured around it, not through it.

The op's inputs are the layer's output, its positions, its extra tensor arguments (e.g.
DeepSeek's `llama_4_scaling`), so a re-run gets the very tensors the first pass got, and the
gate, which also orders the op after the traced step that computes it.
`telltale::refuse_layer` raises, at run time, the message of a layer that does not return
`(hidden_states, residual)` (see layers.py).
"""

from __future__ import annotations

import functools

import torch
from torch.library import Library

from telltale_norm.vllm_adapter import internals, state
from telltale_norm.vllm_adapter.rerun import rerun_layer

OP_NAME = "telltale::layer_step"
_LIB = Library("telltale", "FRAGMENT")  # noqa: TID251 - the op lives as long as the module


def _layer_step(hidden: torch.Tensor, residual: torch.Tensor, positions: torch.Tensor,
                extras: list[torch.Tensor | None], gate: torch.Tensor, layer: int) -> None:
    runtime = state.RUNTIME
    if runtime is not None:
        rerun = functools.partial(rerun_layer, state.LAYERS[layer], positions, extras)
        runtime.loop_layer(layer, hidden, residual, gate, rerun)


def _layer_step_fake(hidden: torch.Tensor, residual: torch.Tensor, positions: torch.Tensor,
                     extras: list[torch.Tensor | None], gate: torch.Tensor, layer: int) -> None:
    return None


def _refuse_layer(positions: torch.Tensor, layer: int) -> None:
    from telltale_norm.vllm_adapter.layers import UnsupportedModelError

    raise UnsupportedModelError(state.LAYERS[layer]._telltale_refusal)


def _refuse_layer_fake(positions: torch.Tensor, layer: int) -> None:
    return None


def _register() -> None:
    if hasattr(torch.ops.telltale, "layer_step"):
        return
    register = internals.require("direct_register_custom_op")
    register(
        op_name="layer_step",
        op_func=_layer_step,
        mutates_args=["hidden", "residual"],
        fake_impl=_layer_step_fake,
        target_lib=_LIB,
    )
    register(
        op_name="refuse_layer",
        op_func=_refuse_layer,
        mutates_args=["positions"],  # declared (never done) so the compiler keeps the call
        fake_impl=_refuse_layer_fake,
        target_lib=_LIB,
    )


_register()


def layer_step(hidden: torch.Tensor, residual: torch.Tensor, positions: torch.Tensor,
               extras: list[torch.Tensor | None], gate: torch.Tensor, layer: int) -> None:
    torch.ops.telltale.layer_step(hidden, residual, positions, extras, gate, layer)


def refuse_layer(positions: torch.Tensor, layer: int) -> None:
    torch.ops.telltale.refuse_layer(positions, layer)
