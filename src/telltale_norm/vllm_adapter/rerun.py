"""Re-running a decoder layer without leaving state behind (for loop/ALRR).

KV cache: in vLLM 0.32/0.33 the attention layers write K/V only through the forward
context's `slot_mapping`, keyed by their layer name, and write nothing for a layer whose
entry is missing:
- `Attention` on a backend with `forward_includes_kv_cache_update = False` (CPU,
  FlashAttention, FlashInfer, Triton, FlexAttention) writes through the separate op
  `unified_kv_cache_update`;
- `MLAAttention` writes in its own `update_kv_cache` (direct call or the op
  `unified_mla_kv_cache_update`), from `slot_mapping.get(layer_name)`, whatever its backend's
  `forward_includes_kv_cache_update` (which MLA backends inherit as True) says.
So the re-run hides this layer's entries for its duration: the cache keeps the first pass's
keys and values, and the re-run's attention reads them (the token's own first-pass entry
included), exactly what the research code did on FlashAttention.

Recurrent state: a `MambaBase` layer (Mamba, gated delta-net / linear attention, short
convolution) updates its state in place in every forward, whatever the slot mapping; a
re-run would advance it twice. Such layers, backends that write K/V inside their forward,
and cache layers of other kinds (e.g. DeepSeek-V3.2's indexer cache) are not re-run:
`loop_obstacle` names the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from telltale_norm.vllm_adapter import internals


class RerunUnsupportedError(RuntimeError):
    """A decoder layer cannot be re-run without leaving state behind."""


@dataclass(frozen=True)
class LoopObstacle:
    """Why a re-run of a layer would leave state behind."""

    reason: str
    recurrent: bool  # recurrent state (linear attention, Mamba), which the HF config names


def cache_modules(layer: nn.Module) -> list[nn.Module]:
    """A decoder layer's modules that own a KV cache or recurrent state."""
    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase

    return [m for m in layer.modules() if isinstance(m, AttentionLayerBase)]


def attention_layer_names(layer: nn.Module) -> tuple[str, ...]:
    """Names under which a decoder layer's attention modules find their KV cache."""
    return tuple(name for m in cache_modules(layer)
                 if isinstance(name := getattr(m, "layer_name", None), str))


def loop_obstacle(layer: nn.Module) -> LoopObstacle | None:
    """Why re-running `layer` would leave state behind, or None if it leaves none."""
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.model_executor.layers.attention.mla_attention import MLAAttention
    from vllm.model_executor.layers.mamba.abstract import MambaBase

    for module in cache_modules(layer):
        kind = type(module).__name__
        if isinstance(module, MambaBase):
            return LoopObstacle(f"holds recurrent state ({kind}) that every pass advances",
                                recurrent=True)
        if isinstance(module, MLAAttention):
            if getattr(module, "hisparse_cache", None) is not None:
                return LoopObstacle(f"{kind} keeps a sparse cache that every pass updates",
                                    recurrent=False)
            continue  # writes only through the slot mapping (see above)
        if isinstance(module, Attention):
            backend = module.attn_backend
            if getattr(backend, "forward_includes_kv_cache_update", True):
                return LoopObstacle(f"attention backend {backend.__name__} writes the KV "
                                    "cache inside its forward", recurrent=False)
            continue
        return LoopObstacle(f"{kind} keeps a cache of a kind telltale-norm does not know how "
                            "to leave unchanged", recurrent=False)
    return None


def call_layer(layer: nn.Module, positions: torch.Tensor, extras: list[torch.Tensor | None],
               hidden: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Call `layer`'s unwrapped forward as its first pass was called (`layer._telltale_call`,
    recorded by the wrapper), with `hidden`/`residual` in place of its inputs."""
    call = layer._telltale_call
    args: list = [None] * call["num_args"]
    kwargs: dict = {}
    values = [*zip(call["tensor_keys"], extras), *call["constants"].items(),
              *zip(call["core"], (hidden, residual, positions))]
    for key, value in values:
        if isinstance(key, int):
            args[key] = value
        else:
            kwargs[key] = value
    return layer._telltale_original_forward(*args, **kwargs)


def rerun_layer(layer: nn.Module, positions: torch.Tensor, extras: list[torch.Tensor | None],
                hidden: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `layer` again on the given state with its KV writes hidden."""
    slot_mapping = internals.require("get_forward_context")().slot_mapping
    if not isinstance(slot_mapping, dict):
        raise RerunUnsupportedError("loop (ALRR) does not support micro-batched steps")
    saved = {name: slot_mapping.pop(name) for name in layer._telltale_attention_names
             if name in slot_mapping}
    try:
        return call_layer(layer, positions, extras, hidden, residual)
    finally:
        slot_mapping.update(saved)
