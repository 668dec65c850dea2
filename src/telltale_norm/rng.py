"""Counter-based random numbers: one uniform per (seed, stream, layer, position).

A draw depends only on the request's seed and the token's place in its own sequence, never on
the batch it happens to share a step with, so seeded runs repeat under continuous batching.
It is a dozen integer tensor ops: no generator state, no host synchronisation, and nothing
that depends on data, so it runs inside compiled graphs and CUDA graphs.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF

# Streams keep the draws of different uses independent.
STREAM_SUPPRESS = 1
STREAM_TTTS = 2


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # A well-known 32-bit integer finaliser; the multiplier is < 2**31 so int64 never overflows.
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    return (x >> 16) ^ x


def uniform(seed: torch.Tensor, stream: int, layer: int, position: torch.Tensor) -> torch.Tensor:
    """Uniform floats in [0, 1), one per element of the int64 tensors `seed` and `position`.
    The layer enters as a Python constant: no tensor is built from host data."""
    key = _mix32((seed.long() & _MASK32) ^ (stream * 0x9E3779B1 & _MASK32))
    key = _mix32(key ^ (layer * 0x7F4A7C15 & _MASK32))
    key = _mix32(key ^ (position.long() & _MASK32))
    return key.double().div(2.0**32).float().clamp(max=1.0 - 2.0**-24)
