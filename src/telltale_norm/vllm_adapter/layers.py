"""Find a loaded model's decoder layers and route each layer's output through our op.

No list of model classes: any decoder-layer list whose layers' forward takes parameters named
`hidden_states`, `residual` and `positions` (in any order, with any extra arguments) and
returns `(hidden_states, residual)` fits: Llama, Qwen2/3, Qwen3-MoE, Mistral, Gemma2/3, Phi3,
DeepSeek-V2/V3 (`llama_4_scaling`), gpt-oss, Qwen3-Next, ... Anything else is refused at
engine start with a message naming the layer class and its signature.

Only the engine's patched layers are wrapped. The wrapper is plain Python that vLLM's
torch.compile traces once. A layer's output goes through the runtime's graph-safe step,
traced into the compiled graph as ordinary tensor operations (and replayed inside CUDA
graphs). Where loop is possible on the engine and the layer can be re-run, it then goes
through the opaque op `telltale::layer_step`, whose Python runs every step: the wrapper finds the three arguments by positions computed here, at wrap time, and records how
the layer was called (which extra arguments, positional or by keyword) in
`layer._telltale_call`, so a re-run (`rerun.call_layer`) can rebuild the same call. Extra
tensors (and Nones) travel into the op as op inputs, so a compiled graph hands the op each
step's values; other extras (ints, modules...) are constants of the graph, recorded as such.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Collection

import torch
from torch import nn

from telltale_norm.vllm_adapter import state
from telltale_norm.vllm_adapter.op import layer_step, refuse_layer
from telltale_norm.vllm_adapter.rerun import attention_layer_names, loop_obstacle

CORE = ("hidden_states", "residual", "positions")  # the arguments a fitting forward names


class UnsupportedModelError(RuntimeError):
    """The model's decoder layers do not have the shape telltale-norm patches."""


def _signature(layer: nn.Module) -> inspect.Signature | None:
    forward = getattr(layer, "_telltale_original_forward", layer.forward)  # wrapped already?
    try:
        return inspect.signature(forward)
    except (TypeError, ValueError):
        return None


def describe_forward(layer: nn.Module) -> str:
    """`Class.forward(signature)`, for messages."""
    return f"{type(layer).__name__}.forward{_signature(layer) or '(?)'}"


def core_slots(layer: nn.Module) -> tuple[int | None, ...] | None:
    """Positional index (None: keyword-only) of `hidden_states`, `residual`, `positions` in
    the layer's forward, or None when one of them is not a named parameter."""
    sig = _signature(layer)
    if sig is None:
        return None
    named = {name: p for name, p in sig.parameters.items()
             if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    if not all(name in named for name in CORE):
        return None
    positional = [name for name, p in named.items()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return tuple(positional.index(name) if name in positional else None for name in CORE)


def _fits(layer: nn.Module) -> bool:
    return type(layer).__name__ == "PPMissingLayer" or core_slots(layer) is not None


def _unsupported(model: nn.Module, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"telltale-norm cannot patch model architecture {type(model).__name__}: {why}. "
        "Supported are decoder layers whose forward takes hidden_states, residual and "
        "positions (any order, extra arguments allowed) and returns (hidden_states, "
        "residual), e.g. Llama, Qwen2/3, Qwen3-MoE, Mistral, Gemma2/3, Phi3, DeepSeek-V2/V3, "
        "gpt-oss, Qwen3-Next. Unset VLLM_PATCH to run this model without telltale-norm."
    )


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder-layer list (the longest `ModuleList` named `layers`)."""
    candidates = [
        module for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] == "layers" and len(module)
        and any(type(m).__name__ != "PPMissingLayer" for m in module)
    ]
    if not candidates:
        raise _unsupported(model, "no decoder-layer list ('layers') was found")
    layers = max(candidates, key=len)
    unfit = [layer for layer in layers if not _fits(layer)]
    if unfit:
        raise _unsupported(model, f"its layers ({describe_forward(unfit[0])}) do not take "
                                  "hidden_states, residual and positions")
    return layers


def wrap_decoder_layers(model: nn.Module, step_layers: Collection[int] | None = None,
                        loop: bool = True) -> list[tuple[int, nn.Module]]:
    """Make the local decoder layers of `step_layers` (default: all) pass their output
    through the runtime's graph-safe step, then through `telltale::layer_step` where `loop`
    is possible and the layer can be re-run.

    Returns `(index, layer)` pairs of the wrapped layers. Idempotent; the original forward
    stays reachable as `layer._telltale_original_forward` (used to re-run a layer), and
    `layer._telltale_loop_obstacle` says why a re-run would leave state behind (None: it
    leaves none).
    """
    layers = find_decoder_layers(model)
    wrapped = []
    for index, layer in enumerate(layers):
        if type(layer).__name__ == "PPMissingLayer" or (
                step_layers is not None and index not in step_layers):
            continue
        if not hasattr(layer, "_telltale_original_forward"):
            layer._telltale_refusal = str(_unsupported(
                model, f"layer {index} ({describe_forward(layer)}) does not return "
                       "(hidden_states, residual) as two tensors"))
            layer._telltale_attention_names = attention_layer_names(layer)
            layer._telltale_loop_obstacle = loop_obstacle(layer)
            layer._telltale_call = {}
            layer._telltale_original_forward = layer.forward
            use_op = loop and layer._telltale_loop_obstacle is None
            layer.forward = types.MethodType(_make_forward(index, core_slots(layer), use_op),
                                             layer)
        wrapped.append((index, layer))
    return wrapped


def _is_pair(out) -> bool:
    return (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], torch.Tensor)
            and isinstance(out[1], torch.Tensor))


def _record_call(call: dict, args: tuple, kwargs: dict,
                 slots: tuple[int | None, ...]) -> list[torch.Tensor | None]:
    """Record in `call` how the layer was called; return the extra tensor arguments.

    Keys are positional indices (int) or keyword names (str). Tensors and Nones are
    returned (they become op inputs); other extras are stored as constants."""
    core = tuple(i if i is not None and i < len(args) else name
                 for i, name in zip(slots, CORE))
    tensor_keys, tensors, constants = [], [], {}
    for key, value in [*enumerate(args), *kwargs.items()]:
        if key in core:
            continue
        if value is None or isinstance(value, torch.Tensor):
            tensor_keys.append(key)
            tensors.append(value)
        else:
            constants[key] = value
    call["num_args"] = len(args)
    call["core"] = core
    call["tensor_keys"] = tuple(tensor_keys)
    call["constants"] = constants
    return tensors


def _make_forward(index: int, slots: tuple[int | None, ...], use_op: bool):
    where = slots[CORE.index("positions")]

    def forward(self: nn.Module, *args, **kwargs):
        out = self._telltale_original_forward(*args, **kwargs)
        positions = args[where] if where is not None and where < len(args) else (
            kwargs["positions"])
        if not _is_pair(out):
            # Raised by an op at run time, not here: under torch.compile a Python exception
            # raised while tracing loses its message.
            refuse_layer(positions, index)
            return out
        hidden, residual = out
        runtime = state.RUNTIME
        if runtime is not None:
            hidden, residual, gate = runtime.layer_step(index, hidden, residual)
        else:  # no engine attached (a model wrapped by hand): nothing to gate
            gate = hidden.new_empty(0, 2)
        if use_op:
            layer_step(hidden, residual, positions,
                       _record_call(self._telltale_call, args, kwargs, slots), gate, index)
        return hidden, residual

    return forward
