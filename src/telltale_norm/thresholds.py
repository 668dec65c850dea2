"""Thresholds tau: streaming quartiles for the adaptive (IQR) rule, and calibration files.

`StreamingQuantiles` keeps, per layer, a histogram of log-norms with fixed bins (relative
resolution about 0.3 %). Unlike the research code's P-square estimator fed with the per-step
*mean* norm, it takes every decode token, so tau does not depend on how many requests share a
step, and it is updated with one `index_add_` per layer per step: no host synchronisation.
"""

from __future__ import annotations

import json
import math
import re
from functools import lru_cache
from pathlib import Path

import torch

# log-norm range covered by the bins; norms outside are clamped into the end bins.
_LOG_LO = math.log(1e-4)
_LOG_HI = math.log(1e7)
DEFAULT_BINS = 8192

CALIBRATION_PERCENTILES = (1, 5, 10, 25, 50, 75, 90, 95, 99)


class StreamingQuantiles:
    """Per-layer streaming quantiles of positive values (norms), on any device."""

    def __init__(self, num_layers: int, device: torch.device | str = "cpu",
                 bins: int = DEFAULT_BINS) -> None:
        self.bins = bins
        self.width = (_LOG_HI - _LOG_LO) / bins
        self.counts = torch.zeros(num_layers, bins, dtype=torch.float64, device=device)
        self.sum = torch.zeros(num_layers, dtype=torch.float64, device=device)
        # Q1 and Q3 per layer as of the current step's start (`refresh_quartiles`): what the
        # layer steps read
        self.step_quartiles = torch.full((num_layers, 2), math.nan, device=device)
        # made once: a tensor built from host data on every step would copy to the device
        self._quartile_q = torch.tensor([0.25, 0.75], dtype=torch.float64, device=device)

    @property
    def total(self) -> torch.Tensor:
        """Values seen per layer `[num_layers]`."""
        return self.counts.sum(1)

    def update(self, layer: int | torch.Tensor, values: torch.Tensor,
               weight: torch.Tensor | None = None) -> None:
        """Add `values` (weighted 0/1 by `weight`, so masks need no boolean indexing) to
        `layer` (an int, or a [1] int64 device tensor: then every layer runs the same
        code)."""
        v = values.double()
        w = torch.ones_like(v) if weight is None else weight.double()
        idx = v.clamp_min(1e-30).log_().sub_(_LOG_LO).div_(self.width).long()
        # scatters into the whole buffers (traced, writing through a row view would copy
        # the whole histogram on every step)
        row = torch.as_tensor(layer, device=idx.device)
        self.counts.index_put_((row.expand_as(idx), idx.clamp_(0, self.bins - 1)), w,
                               accumulate=True)
        self.sum.index_put_((row.view(1),), v.dot(w).unsqueeze(0), accumulate=True)

    def refresh_quartiles(self, layers: torch.Tensor | slice) -> None:
        """Store Q1 and Q3 of `layers` (int64, on the device) in `step_quartiles`, once per
        step before its forward: a step's thresholds come from the values seen before it,
        and the histograms are searched once per step instead of once per layer. `layers`
        may be a slice: its rows are then read in place (a gather copies every bin)."""
        self.step_quartiles[layers] = self._quantiles(self.counts[layers],
                                                      self._quartile_q).float()

    def quartiles(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Q1 and Q3 of the layer's values now (device scalars, NaN while empty)."""
        q1, q3 = self.quantiles(layer, self._quartile_q)
        return q1, q3

    def reset(self) -> None:
        self.counts.zero_()
        self.sum.zero_()
        self.step_quartiles.fill_(math.nan)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for t in (self.counts, self.sum, self.step_quartiles))

    def quantiles(self, layer: int, qs: torch.Tensor | list[float]) -> torch.Tensor:
        """Estimates of the `qs` quantiles (numpy's 'linear' definition) of layer's values.

        The k-th smallest value is placed inside its bin by its rank among the bin's values;
        the estimate interpolates between ranks floor(q(n-1)) and ceil(q(n-1)). NaN if empty.
        """
        q = torch.as_tensor(qs, dtype=torch.float64, device=self.counts.device)
        return self._quantiles(self.counts[layer].view(1, self.bins), q)[0]

    def _quantiles(self, counts: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """`[rows, len(q)]` quantiles of the histograms `counts` `[rows, bins]` (few
        operations: on the host, each costs more than its arithmetic)."""
        cum = counts.cumsum(1)
        n = cum[:, -1:]
        rank = q * (n - 1).clamp_min(0)
        low = rank.floor()
        # both neighbouring ranks of every row in one search
        ranks = torch.cat([low, rank.ceil()], 1)
        b = torch.searchsorted(cum, ranks, right=True).clamp_(max=self.bins - 1)
        in_bin = counts.gather(1, b)
        # the rank's place among its bin's values (cum[b] - in_bin values come before them)
        within = ((ranks - cum.gather(1, b) + in_bin + 0.5) / in_bin.clamp_min(1)).clamp_(0, 1)
        value = ((b + within) * self.width + _LOG_LO).exp_()
        lo, hi = value.split(len(q), 1)
        return torch.where(n > 0, lo.lerp(hi, rank - low), math.nan)

    def mean(self, layer: int) -> float:
        total = float(self.counts[layer].sum())
        return float(self.sum[layer]) / total if total else float("nan")


def adaptive_tau(q1: torch.Tensor, q3: torch.Tensor, iqr_k: torch.Tensor | float,
                 min_iqr: torch.Tensor | float, floor: torch.Tensor | float) -> torch.Tensor:
    """`tau = max(floor, Q3 + k * max(Q3 - Q1, min_iqr))` (elementwise)."""
    iqr = torch.maximum(q3 - q1, torch.as_tensor(min_iqr, dtype=q3.dtype, device=q3.device))
    return torch.maximum(torch.as_tensor(floor, dtype=q3.dtype, device=q3.device),
                         q3 + iqr_k * iqr)


# ---------------------------------------------------------------- calibration files

_PCT_KEY = re.compile(r"^p(\d+(?:\.\d+)?)$")


def interpolate_percentiles(percentiles: dict[float, float], q: float) -> float:
    """Value at quantile `q` (0..1), linear between listed percentiles, clamped at the ends."""
    points = sorted((p / 100.0, v) for p, v in percentiles.items())
    if q <= points[0][0]:
        return points[0][1]
    for (q0, v0), (q1, v1) in zip(points, points[1:]):
        if q <= q1:
            return v0 + (v1 - v0) * (q - q0) / (q1 - q0)
    return points[-1][1]


def read_calibration(path: str | Path) -> dict[int, dict[float, float]]:
    """Read `{"per_layer": {"21": {"p50": .., "p90": ..}}}`: layer -> percentile -> value."""
    allowed = ('a JSON file {"per_layer": {"<layer>": {"p50": <norm>, "p90": ...}}} '
               "(telltale-norm calibrate writes one)")
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ValueError(f"cannot read it ({err.strerror}); allowed: {allowed}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"malformed JSON ({err.msg} at char {err.pos}); allowed: {allowed}"
                         ) from None
    per_layer = data.get("per_layer") if isinstance(data, dict) else None
    if not isinstance(per_layer, dict) or not per_layer:
        raise ValueError(f"no 'per_layer' object; allowed: {allowed}")
    out: dict[int, dict[float, float]] = {}
    for layer, stats in per_layer.items():
        pcts = {}
        if isinstance(stats, dict):
            for key, value in stats.items():
                match = _PCT_KEY.match(str(key))
                if match and isinstance(value, (int, float)) and math.isfinite(value):
                    pcts[float(match.group(1))] = float(value)
        if not str(layer).isdigit() or not pcts:
            raise ValueError(f"layer entry {layer!r} has no percentiles; allowed: {allowed}")
        out[int(layer)] = pcts
    return out


@lru_cache(maxsize=64)
def _cached_tau(path: str, mtime: float, q: float) -> tuple[tuple[int, float], ...]:
    cal = read_calibration(path)
    return tuple(sorted((layer, interpolate_percentiles(p, q)) for layer, p in cal.items()))


def load_calibrated_tau(path: str | Path, q: float) -> dict[int, float]:
    """Per-layer tau at quantile `q` from a calibration file (cached by path and mtime)."""
    try:
        mtime = Path(path).stat().st_mtime
    except OSError as err:
        raise ValueError(f"cannot read it ({err.strerror})") from None
    return dict(_cached_tau(str(path), mtime, float(q)))


def calibration_record(quantiles: StreamingQuantiles, layers: list[int]) -> dict:
    """The statistics-file content for `layers` (count, mean and percentiles p1..p99)."""
    qs = [p / 100.0 for p in CALIBRATION_PERCENTILES]
    per_layer = {}
    for layer in layers:
        count = int(quantiles.total[layer])
        if not count:
            continue
        values = quantiles.quantiles(layer, qs).tolist()
        entry = {"count": count, "mean": quantiles.mean(layer)}
        entry.update({f"p{p}": v for p, v in zip(CALIBRATION_PERCENTILES, values)})
        per_layer[str(layer)] = entry
    return {"per_layer": per_layer}
