"""Norm-trace figures: one subplot per patched layer, the norm of each trace against its decode
step, tau as a dashed line and each intervention marked by its own marker.

Uses matplotlib's object API with the Agg renderer (no pyplot, no display needed). The figure
has a fixed size per layer so its pixel size is predictable: `figure_size_px(num_layers)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from telltale_norm.traces import ACTION_INJECT, ACTION_RERUN, ACTION_SUPPRESS, RequestTrace

FIG_WIDTH_IN = 10.0
LAYER_HEIGHT_IN = 2.2
DPI = 100
# action bit -> (marker, legend text)
ACTION_MARKERS = {
    ACTION_SUPPRESS: ("v", "suppressed"),
    ACTION_RERUN: ("o", "re-run (loop)"),
    ACTION_INJECT: ("*", "injected (ttts)"),
}


def figure_size_px(num_layers: int) -> tuple[int, int]:
    """(width, height) in pixels of a figure with `num_layers` subplots."""
    return round(FIG_WIDTH_IN * DPI), round(LAYER_HEIGHT_IN * max(num_layers, 1) * DPI)


def plot_traces(traces: Sequence[RequestTrace], path: str | Path,
                labels: Sequence[str] | None = None, title: str = "") -> Path:
    """Draw `traces` (one colour each, named by `labels`) into the PNG file `path`."""
    labels = list(labels) if labels is not None else [t.request_id for t in traces]
    layers = sorted({layer for trace in traces for layer in trace.layers})
    width, height = figure_size_px(len(layers))
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(max(len(layers), 1), 1, sharex=True, squeeze=False)[:, 0]
    colors = [f"C{i % 10}" for i in range(len(traces))]
    actions_seen: set[int] = set()

    # Earlier traces are drawn wider, so a trace identical to a later one still shows.
    widths = np.linspace(2.6, 1.0, len(traces)) if len(traces) > 1 else [1.2]
    for ax, layer in zip(axes, layers):
        for trace, label, color, lw in zip(traces, labels, colors, widths):
            if layer not in trace.layers:
                continue
            col = trace.layers.index(layer)
            steps = np.arange(trace.norm.shape[0])
            norm = trace.norm[:, col]
            ax.plot(steps, norm, color=color, lw=lw, label=label)
            tau = np.where(np.isfinite(trace.tau[:, col]), trace.tau[:, col], np.nan)
            ax.plot(steps, tau, color=color, lw=0.9, ls="--")  # NaN (no tau yet) leaves a gap
            for bit, (marker, _) in ACTION_MARKERS.items():
                hit = (trace.action[:, col] & bit) != 0
                if hit.any():
                    actions_seen.add(bit)
                    ax.scatter(steps[hit], norm[hit], marker=marker, s=22, color=color,
                               edgecolors="black", linewidths=0.4, zorder=3)
        ax.set_title(f"layer {layer}", fontsize=9, loc="left")
        ax.set_ylabel("‖h‖₂", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("decode step", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)

    # One legend for the whole figure, beside the top subplot: traces by colour, then what the
    # dashed line and the markers mean.
    handles = [Line2D([], [], color=c, lw=1.5, label=lab) for c, lab in zip(colors, labels)]
    handles.append(Line2D([], [], color="gray", lw=0.9, ls="--", label="tau"))
    handles += [Line2D([], [], ls="", marker=ACTION_MARKERS[bit][0], color="gray",
                       markeredgecolor="black", label=ACTION_MARKERS[bit][1])
                for bit in sorted(actions_seen)]
    axes[0].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
                   frameon=False)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path
