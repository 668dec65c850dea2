"""Counter-based random numbers: one uniform per (seed, stream, layer, position).

A draw depends only on the request's seed and the token's place in its own sequence, never on
the batch it happens to share a step with, so seeded runs repeat under continuous batching.
No generator state, no host synchronisation, and nothing that depends on data, so it runs
inside compiled graphs and CUDA graphs. The part that does not depend on the position is a
request's *layer key*, computed once on the host when it is admitted (`layer_key`); each
step then costs a dozen integer tensor ops per token (`draw`).
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

_MASK32 = 0xFFFFFFFF

# Streams keep the draws of different uses independent.
STREAM_SUPPRESS = 1
STREAM_TTTS = 2

Ints = TypeVar("Ints", int, np.ndarray, torch.Tensor)  # int64 values of one kind


def _mix32(x: Ints) -> Ints:
    # A well-known 32-bit integer finaliser; the multiplier is < 2**31 so int64 never overflows.
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    return (x >> 16) ^ x


def layer_key(seed: Ints, stream: Ints, layer: Ints) -> Ints:
    """The key of (seed, stream, layer): Python ints, int64 numpy arrays or tensors
    (broadcast), the same values from each."""
    key = _mix32((seed & _MASK32) ^ (stream * 0x9E3779B1 & _MASK32))
    return _mix32(key ^ (layer * 0x7F4A7C15 & _MASK32))


def draw(key: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """Uniform floats in [0, 1), one per element of the int64 tensors `key` (`layer_key`)
    and `position`."""
    key = _mix32(key ^ (position.long() & _MASK32))
    return key.double().div(2.0**32).float().clamp(max=1.0 - 2.0**-24)


def uniform(seed: torch.Tensor, stream: int, layer: int, position: torch.Tensor
            ) -> torch.Tensor:
    """`draw` for the int64 tensors `seed` and `position` in one call."""
    return draw(layer_key(seed.long(), stream, layer), position)
