"""rerank: LRS, l2-guided Response Selection (SPEC.md "rerank").

Per request and patched layer, over its decode steps: A = sum of norms, B = area above tau,
C = count above tau, D = the part of B from the last LATE_FRAC of the steps, and the
length-normalised mean norm A / steps. Layers are aggregated by sum or mean, and among the
candidates sampled for one prompt the highest score wins; ties go to the lowest index.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def layer_scores(norm: np.ndarray, tau: np.ndarray, late_frac: float) -> dict[str, np.ndarray]:
    """Every metric per layer from a `[steps, layers]` trace (tau not finite: never above)."""
    norm = np.asarray(norm, dtype=np.float64)
    tau = np.asarray(tau, dtype=np.float64)
    steps = norm.shape[0]
    finite = np.isfinite(tau)
    above = np.where(finite, np.maximum(0.0, norm - np.where(finite, tau, 0.0)), 0.0)
    late = steps - math.ceil(late_frac * steps)
    return {
        "A": norm.sum(axis=0),
        "B": above.sum(axis=0),
        "C": (finite & (norm > np.where(finite, tau, 0.0))).sum(axis=0).astype(np.float64),
        "D": above[late:].sum(axis=0),
        "mean": norm.sum(axis=0) / max(steps, 1),
    }


def candidate_scores(norm: np.ndarray, tau: np.ndarray, metric: str, layer_agg: str,
                     late_frac: float) -> dict[str, float | str]:
    """All metrics aggregated over layers, plus `score` (the configured one) and `metric`."""
    agg = np.mean if layer_agg == "mean" else np.sum
    scores: dict[str, float | str] = {
        name: float(agg(values)) if values.size else 0.0
        for name, values in layer_scores(norm, tau, late_frac).items()}
    scores["score"] = scores[metric]
    scores["metric"] = metric
    return scores


def best_index(scores: Sequence[float]) -> int:
    """Position of the highest score; the first one on ties (deterministic)."""
    return int(np.argmax(np.asarray(scores, dtype=np.float64)))
