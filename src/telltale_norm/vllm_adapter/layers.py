"""Find a loaded model's decoder layers and route each layer's output through our op.

No list of model classes: any decoder-layer list whose layers take
`(positions, hidden_states, residual, ...)` and return `(hidden_states, residual)` fits
(Llama, Qwen2/3, Mistral, Gemma2/3, Phi3, ...). Anything else is refused at engine start.
"""

from __future__ import annotations

import inspect
import types

import torch
from torch import nn

from telltale_norm.vllm_adapter.op import layer_step
from telltale_norm.vllm_adapter.rerun import attention_layer_names

_SIGNATURE = ("positions", "hidden_states", "residual")


class UnsupportedModelError(RuntimeError):
    """The model's decoder layers do not have the shape telltale-norm patches."""


def _fits(layer: nn.Module) -> bool:
    if type(layer).__name__ == "PPMissingLayer":  # another pipeline rank's layer
        return True
    try:
        params = list(inspect.signature(layer.forward).parameters)
    except (TypeError, ValueError):
        return False
    return tuple(params[:3]) == _SIGNATURE


def _unsupported(model: nn.Module, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"telltale-norm cannot patch model architecture {type(model).__name__}: {why}. "
        "Supported are decoder layers with forward(positions, hidden_states, residual) -> "
        "(hidden_states, residual), e.g. Llama, Qwen2, Qwen3, Mistral, Gemma2, Gemma3, Phi3. "
        "Unset VLLM_PATCH to run this model without telltale-norm."
    )


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder-layer list (the longest `ModuleList` of fitting layers)."""
    candidates = [
        module for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] == "layers" and len(module)
        and any(type(m).__name__ != "PPMissingLayer" for m in module)
    ]
    if not candidates:
        raise _unsupported(model, "no decoder-layer list ('layers') was found")
    layers = max(candidates, key=len)
    if not all(_fits(layer) for layer in layers):
        raise _unsupported(
            model, f"its layers ({type(layers[0]).__name__}) do not take "
            "(positions, hidden_states, residual)")
    return layers


def wrap_decoder_layers(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """Make every local decoder layer call `telltale::layer_step` on its output.

    Returns `(index, layer)` pairs of the wrapped layers. Idempotent; the original forward
    stays reachable as `layer._telltale_original_forward` (used to re-run a layer).
    """
    layers = find_decoder_layers(model)
    wrapped = []
    for index, layer in enumerate(layers):
        if type(layer).__name__ == "PPMissingLayer":
            continue
        if not hasattr(layer, "_telltale_original_forward"):
            layer._telltale_attention_names = attention_layer_names(layer)
            layer._telltale_original_forward = layer.forward
            layer.forward = types.MethodType(_make_forward(index, model), layer)
        wrapped.append((index, layer))
    return wrapped


def _make_forward(index: int, model: nn.Module):
    def forward(self: nn.Module, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None, *args, **kwargs):
        out = self._telltale_original_forward(positions, hidden_states, residual,
                                              *args, **kwargs)
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], torch.Tensor)
                and isinstance(out[1], torch.Tensor)):
            raise _unsupported(model, f"layer {index} did not return (hidden_states, residual)")
        hidden, res = out
        layer_step(hidden, res, positions, index)
        return hidden, res

    return forward
