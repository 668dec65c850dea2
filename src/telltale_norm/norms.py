"""The paper's signal: the l2 norm of the residual stream after a decoder layer.

vLLM layers return `(hidden_states, residual)` and defer the residual add to the next layer,
so the state the paper measures is `x = hidden_states + residual`. Edits of `x` are written
back into `hidden_states`, leaving `residual` untouched.
"""

from __future__ import annotations

import torch


def residual_stream(hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """`x = hidden + residual` in float32 (`hidden` alone for layers without a residual)."""
    x = hidden.float()
    return x if residual is None else x + residual.float()


def token_norms(hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """Per-token `||x||_2` over the hidden dimension, in float32: shape `[tokens]`."""
    return torch.linalg.vector_norm(residual_stream(hidden, residual), dim=-1)


def scale_residual_stream(hidden: torch.Tensor, residual: torch.Tensor | None,
                          factor: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """The `hidden` that makes `x <- factor * x` for the `chosen` tokens.

    `hidden_new = factor * x - residual = factor * hidden + (factor - 1) * residual`,
    computed in float32; the other tokens keep their exact bits.
    """
    f = factor.unsqueeze(-1)
    new = hidden.float() * f
    if residual is not None:
        new = new + residual.float() * (f - 1.0)
    return torch.where(chosen.unsqueeze(-1), new.to(hidden.dtype), hidden)


def shifted_residual_stream(hidden: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The `hidden` that makes `x <- x + delta` per token, computed in float32 and returned
    in hidden's dtype (rows of zeros leave a token's bits unchanged)."""
    return (hidden.float() + delta).to(hidden.dtype)
