"""docs/BENCHMARKS.md and its plot from bench/overhead.py's results: the tables above the
analysis mark are rewritten, the analysis below it is kept."""

from __future__ import annotations

from pathlib import Path

from step_time import CONFIGS


# Per-step targets of the graph-native step (the plugin's own time over plugin-off's step).
TARGETS = {"monitor": 1.01, "rerank": 1.01, "suppress tau=1e30": 1.02,
           "suppress adaptive": 1.02, "ttts": 1.02, "ttts tau=adaptive": 1.02,
           "loop tau=1e30": 1.01}
START_TARGET = 1.2  # a patched compiled start over a plain compiled start
ANALYSIS_MARK = "<!-- analysis: kept when the report is rewritten -->"


def _table(header: str, batches: list[int], rows: dict[str, list[str]]) -> list[str]:
    return [f"| {header} | " + " | ".join(f"batch {b}" for b in batches) + " |",
            "|---|" + "---|" * len(batches),
            *(f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows.items())]


def write_report(result: dict, path: Path, plot_path: Path) -> None:
    eng, steps, own = result["engine"], result["steps"], result["runtime"]
    batches = eng["batches"]
    step_ms = {b: 1000 * b / eng["tokens_per_s"]["off"][b] for b in batches}
    lines = [
        "# Benchmarks", "",
        f"Machine: {result['machine']}. Model: {result['model']} (bf16), "
        f"{'compiled' if eng['compiled'] else 'eager'}, {eng['tokens']} output tokens per "
        f"request, {eng['reps']} repetitions interleaved between the engines, medians. "
        f"Command: `{result['command']}`. Patched layers {eng['layers']}; realistic tau = p90 "
        "of each layer's decode norms, calibrated in the same run. Engines: `graph` "
        "(VLLM_PATCH=monitor: the step traced into the compiled model), `op` (with "
        "TELLTALE_ALLOW_LOOP=1: an opaque op at every patched layer, as every engine had "
        "before; loop runs there only).", "",
        "## The plugin's own time per decode step", "",
        "Begin of step + every patched layer + end of step, on random states of the model's "
        "shape (ms, lower quartile of 60 steps, configurations taking turns in a random "
        f"order; in a fresh process on an engine worker's CPUs {result['engine_cores']}, one "
        "thread each, as vLLM binds it), and the time "
        "per step relative to plugin-off's measured step (" + ", ".join(
            f"batch {b}: {step_ms[b]:.0f} ms" for b in batches) + "): `graph` traced with "
        "torch.compile (plus loop's Python where loop runs), net of entering a compiled graph "
        "(" + ", ".join(f"{own['entry_ms'][b]:.2f} ms" for b in batches) + ": an engine's "
        "compiled forward pays it with or without the plugin), `op` eager.", "",
        *_table("configuration", batches, {
            f"{name} ({path})": [f"{per[b]:.2f} ms ({1 + per[b] / step_ms[b]:.3f}x)"
                                 for b in batches]
            for name in _measured(own) for path, per in ((p, own[p][name])
                                                         for p in ("graph", "op"))}),
        "", "### Targets (graph path, per step)", "",
        "| configuration | batch | per step | target | |", "|---|---|---|---|---|"]
    for b in batches:
        for name, target in TARGETS.items():
            if name not in own["graph"]:
                continue
            ratio = 1 + own["graph"][name][b] / step_ms[b]
            lines.append(f"| {name} | {b} | {ratio:.3f}x | <= {target:.2f}x | "
                         f"{'met' if ratio <= target else '**missed**'} |")
    starts = eng["start_s"]
    lines += ["", "## Compiled engine start (vLLM's compile cache off)", "",
              "The engines start one after the other in this process, with inductor's code "
              "cache on: kernels an earlier run built load from disk, so an engine whose "
              "kernels changed since then pays their build here. The start target (a "
              f"patched start at most {START_TARGET}x a plain one) is measured with every "
              "cache off, each engine in a fresh process, by `python bench/start_time.py`.",
              "", "| engine | start | ratio to off |", "|---|---|---|"]
    for name, seconds in starts.items():
        lines.append(f"| {name} | {seconds:.0f} s | {seconds / starts['off']:.2f}x |")
    lines += ["", "## Decode throughput: ratio of plugin-off tokens/s to each configuration's",
              "", *_table("configuration", batches, {
                  name: [f"{per[b]:.3f}" for b in batches]
                  for name, per in eng["ratio_to_off"].items()}),
              "", "Tokens per second (median):", "", *_table("configuration", batches, {
                  name: [f"{per[b]:.1f}" for b in batches]
                  for name, per in eng["tokens_per_s"].items()}),
              "", "Fraction of layer-tokens re-run by `loop realistic`: " + ", ".join(
                  f"batch {b}: {eng['loop_rerun_fraction_of_layer_tokens'][b]:.3f}"
                  for b in batches), "",
              "## Per-step work: vectorised vs per-token loop (ms, median)", "",
              "| batch | ERSS vectorised | ERSS loop | speed-up | LRS vectorised | LRS loop |",
              "|---|---|---|---|---|---|"]
    for b in steps["ttts_vectorised_ms"]:
        v, lp = steps["ttts_vectorised_ms"][b], steps["ttts_loop_ms"][b]
        lines.append(f"| {b} | {v:.3f} | {lp:.3f} | {lp / v:.1f}x | "
                     f"{steps['lrs_vectorised_ms'][b]:.3f} | {steps['lrs_loop_ms'][b]:.3f} |")
    lines += ["", f"![decode overhead]({plot_path.name})", ""]
    old = path.read_text() if path.exists() else ""
    analysis = old[old.index(ANALYSIS_MARK):] if ANALYSIS_MARK in old else ANALYSIS_MARK + "\n"
    path.write_text("\n".join(lines) + "\n" + analysis)
    _plot(own, step_ms, batches, plot_path)


def _plot(own: dict, step_ms: dict, batches: list[int], plot_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=100, sharey=True)
    names = _measured(own)
    width = 0.8 / len(batches)
    for ax, path in zip(axes, ("graph", "op")):
        for i, b in enumerate(batches):
            ax.bar([j + i * width for j in range(len(names))],
                   [100 * own[path][n][b] / step_ms[b] for n in names], width,
                   label=f"batch {b}")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, rotation=30,
                      ha="right")
        ax.set_title(f"{path}: the plugin's own time per step")
        ax.axhline(1.0, color="black", linewidth=0.6, linestyle=":")
    axes[0].set_ylabel("% of plugin-off's decode step")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(plot_path)


def _measured(own: dict) -> list[str]:
    """The configurations of `CONFIGS` that the results hold (an older JSON may lack some)."""
    return [name for name in CONFIGS if name in own["graph"]]
