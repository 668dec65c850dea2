"""`telltale::layer_step`: the opaque custom op through which every patched layer's output passes.

vLLM compiles the model and traces it once, so Python inside a layer would run only during the
trace. A custom op stays opaque to the compiler: its Python body runs on every step, where it
reads the current step's per-request bookkeeping and edits the layer's output in place. On CUDA
the op is added to vLLM's splitting ops, so CUDA graphs are captured around it, not through it.

The op's inputs are the layer's output, its positions and its extra tensor arguments (e.g.
DeepSeek's `llama_4_scaling`), so a re-run (loop) gets the very tensors the first pass got.
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
                extras: list[torch.Tensor | None], layer: int) -> None:
    runtime = state.RUNTIME
    if runtime is not None:
        module = state.LAYERS[layer]
        # A layer a re-run would leave state in is never re-run (loop requests on layers
        # with recurrent state are refused before they get here: see loop_layers.py).
        rerun = None if module._telltale_loop_obstacle else functools.partial(
            rerun_layer, module, positions, extras)
        runtime.on_layer(layer, hidden, residual, rerun)


def _layer_step_fake(hidden: torch.Tensor, residual: torch.Tensor, positions: torch.Tensor,
                     extras: list[torch.Tensor | None], layer: int) -> None:
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
               extras: list[torch.Tensor | None], layer: int) -> None:
    torch.ops.telltale.layer_step(hidden, residual, positions, extras, layer)


def refuse_layer(positions: torch.Tensor, layer: int) -> None:
    torch.ops.telltale.refuse_layer(positions, layer)
