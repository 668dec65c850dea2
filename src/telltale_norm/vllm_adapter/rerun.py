"""Re-running a decoder layer without writing the KV cache (for loop/ALRR).

Why this is backend-agnostic: in vLLM 0.32 attention backends do not write K/V themselves
(`forward_includes_kv_cache_update = False` for CPU, FlashAttention, FlashInfer, FlexAttention
and MLA); a separate op, `unified_kv_cache_update`, writes them, and it writes nothing for a
layer whose entry in the forward context's `slot_mapping` is missing. So the re-run hides
this layer's entry for its duration: the cache keeps the first pass's keys and values, and
the attention of the re-run reads them (the token's own first-pass entry included), exactly
what the research code did on FlashAttention. A backend that writes inside its forward would
defeat this: `check_rerun_supported` refuses it at engine start when loop is the default.
"""

from __future__ import annotations

import torch
from torch import nn

from telltale_norm.vllm_adapter import internals


class RerunUnsupportedError(RuntimeError):
    """The attention backend writes the KV cache inside its forward."""


def _attention_modules(layer: nn.Module) -> list[nn.Module]:
    return [m for m in layer.modules() if isinstance(getattr(m, "layer_name", None), str)
            and getattr(m, "attn_backend", None) is not None]


def attention_layer_names(layer: nn.Module) -> tuple[str, ...]:
    """Names under which a decoder layer's attention modules find their KV cache."""
    return tuple(m.layer_name for m in _attention_modules(layer))


def check_rerun_supported(layer: nn.Module) -> None:
    """Raise if a layer's attention backend writes the KV cache inside its forward."""
    for module in _attention_modules(layer):
        if getattr(module.attn_backend, "forward_includes_kv_cache_update", False):
            raise RerunUnsupportedError(
                f"attention backend {module.attn_backend.__name__} writes the KV cache "
                "inside its forward; loop (ALRR) cannot re-run layers without touching it")


def rerun_layer(layer: nn.Module, positions: torch.Tensor, hidden: torch.Tensor,
                residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `layer` (its unwrapped forward) on the given state with its KV writes hidden."""
    slot_mapping = internals.require("get_forward_context")().slot_mapping
    if not isinstance(slot_mapping, dict):
        raise RerunUnsupportedError("loop (ALRR) does not support micro-batched steps")
    saved = {name: slot_mapping.pop(name) for name in layer._telltale_attention_names
             if name in slot_mapping}
    try:
        return layer._telltale_original_forward(positions, hidden, residual)
    finally:
        slot_mapping.update(saved)
