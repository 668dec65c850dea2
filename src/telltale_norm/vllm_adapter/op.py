"""`telltale::layer_step`: the opaque custom op through which every patched layer's output passes.

vLLM compiles the model and traces it once, so Python inside a layer would run only during the
trace. A custom op stays opaque to the compiler: its Python body runs on every step, where it
reads the current step's per-request bookkeeping and edits the layer's output in place. On CUDA
the op is added to vLLM's splitting ops, so CUDA graphs are captured around it, not through it.
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
                layer: int) -> None:
    runtime = state.RUNTIME
    if runtime is not None:
        rerun = functools.partial(rerun_layer, state.LAYERS[layer], positions)
        runtime.on_layer(layer, hidden, residual, rerun)


def _layer_step_fake(hidden: torch.Tensor, residual: torch.Tensor, positions: torch.Tensor,
                     layer: int) -> None:
    return None


def _register() -> None:
    if hasattr(torch.ops.telltale, "layer_step"):
        return
    internals.require("direct_register_custom_op")(
        op_name="layer_step",
        op_func=_layer_step,
        mutates_args=["hidden", "residual"],
        fake_impl=_layer_step_fake,
        target_lib=_LIB,
    )


_register()


def layer_step(hidden: torch.Tensor, residual: torch.Tensor, positions: torch.Tensor,
               layer: int) -> None:
    torch.ops.telltale.layer_step(hidden, residual, positions, layer)
