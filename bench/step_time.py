"""The plugin's own time per decode step, without an engine: what it adds to a step, measured
precisely (end-to-end ratios on a noisy 2-core machine cannot resolve 1-2 %).

Two paths per configuration, on random states of the model's shape:
- "graph": the graph-safe step of every patched layer traced by torch.compile into one graph
  (what a compiled engine without loop runs), then, for loop, loop's Python per layer (what
  its op runs);
- "op": every patched layer's step run eagerly as Python, as an `enforce_eager` engine runs
  it (skipping the methods no token of the step uses) and as the previous design's opaque
  op ran it at every layer.
Also (unless --no-steps): ERSS's and LRS's per-step work, vectorised against per-token
loops (bench/vectorised_steps.py).

    .venv/bin/python bench/step_time.py     # prints the tables (bench/overhead.py uses it)
    .venv/bin/python bench/step_time.py --batches 1 --configs monitor,ttts   # a part
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

# name -> per-request extra_args. Taus: "huge" 1e30, "p90" a realistic tau per layer, none:
# SPEC's default, the adaptive tau (its quartiles are searched on the host once per step).
CONFIGS = {
    "monitor": {"telltale_method": "monitor"},
    "suppress tau=1e30": {"telltale_method": "suppress", "tau": "huge"},
    "suppress adaptive": {"telltale_method": "suppress", "tau": "p90"},
    "loop tau=1e30": {"telltale_method": "loop", "tau": "huge"},
    "loop realistic": {"telltale_method": "loop", "tau": "p90", "telltale_blowup": 10.0,
                       "telltale_growth_eps": -1.0},
    "ttts": {"telltale_method": "ttts", "tau": "p90"},
    "ttts tau=adaptive": {"telltale_method": "ttts"},
    "rerank": {"telltale_method": "rerank", "tau": "p90"},
}


# The benchmarks' engines: an explicit KV cache (vLLM's CPU worker otherwise takes
# gpu_memory_utilization of its NUMA node's memory, less its own, which some VMs report as a
# fraction of their RAM: 0.12 of it can be less than a compiled worker holds). 256 MiB holds
# ~11k tokens of SmolLM2: batch 32 of the benchmarks' requests, or one of max_model_len.
KV_CACHE_BYTES = 256 << 20


# The inductor options vLLM's CPU platform compiles its model with (vllm/platforms/cpu.py).
VLLM_CPU_INDUCTOR = {"dce": True, "size_asserts": False, "nan_asserts": False,
                     "epilogue_fusion": True, "cpp.dynamic_threads": True}


def vllm_compile_options() -> dict:
    """vLLM's inductor options, and no guards: vLLM's compiled model skips dynamo's guards
    (vllm/compilation/wrapper.py), so a call does not check every buffer the step reads."""
    import torch

    return {**VLLM_CPU_INDUCTOR, "guard_filter_fn": torch.compiler.skip_all_guards_unsafe}


def pin_to_engine_cores(model: str) -> list[int]:
    """Run this process as vLLM's CPU worker of a one-rank engine on `model` runs: on its
    CPUs, one OpenMP thread each (vllm/utils/ompmultiprocessing.py; on 2 cores: one, the
    other reserved for the scheduler). The step's compiled kernels open OpenMP regions, whose
    cost depends on the thread count. Returns the CPUs. Where vLLM binds no CPUs (a GPU
    platform, or VLLM_CPU_OMP_THREADS_BIND=nobind), nothing changes: this process's own."""
    import os

    import torch
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms import current_platform
    from vllm.utils.ompmultiprocessing import OMPProcessManager

    if not current_platform.is_cpu():
        return sorted(os.sched_getaffinity(0))
    config = EngineArgs(model=model, dtype="bfloat16", max_model_len=1024).create_engine_config()
    lists = OMPProcessManager(config).cpu_lists
    if not lists:
        return sorted(os.sched_getaffinity(0))
    cores = lists[0]
    os.sched_setaffinity(0, cores)
    torch.set_num_threads(len(cores))
    return cores


def request_args(config: dict, taus: dict[int, float]) -> dict:
    args = {k: v for k, v in config.items() if k != "tau"}
    if config.get("tau") == "huge":
        args["telltale_tau_json"] = json.dumps({str(k): 1e30 for k in taus})
    elif config.get("tau") == "p90":
        args["telltale_tau_json"] = json.dumps({str(k): v for k, v in taus.items()})
    return args


def runtime_benchmark(model: str, batches: list[int], steps: int = 60,
                      configs: dict | None = None) -> dict:
    """ms per decode step (begin_step + every patched layer + end_step), per path,
    configuration and batch: the lower quartile of `steps` steps, configurations taking turns
    step by step in a new random order each round (this shared machine's noise only ever
    adds time, in bursts; a fixed order made the first configuration pay for the caches the
    one before it left cold). The graph path is net of entering a compiled graph
    (`entry_ms`, which an engine pays per forward anyway)."""
    import numpy as np
    import torch

    from telltale_norm.config import TelltaleConfig, default_layers
    from telltale_norm.runtime import TelltaleRuntime

    configs = CONFIGS if configs is None else configs
    dtype = torch.bfloat16  # the engines' (bench/overhead.py): banks of the model's dtype

    config = json.loads((Path(model) / "config.json").read_text())
    num_layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    layers = list(default_layers(num_layers))
    # the engines of bench/overhead.py: "graph" (loop not possible: no gate, no op) and
    # "op" (TELLTALE_ALLOW_LOOP=1), which is also what a VLLM_PATCH=loop engine traces
    engines = {loop: TelltaleConfig.from_env({
        "VLLM_PATCH": "monitor", "TELLTALE_ALLOW_LOOP": "1" if loop else "0",
        "PATCHED_LAYERS": ",".join(map(str, layers))}) for loop in (False, True)}
    gen = torch.Generator().manual_seed(0)
    # norms of these states are ~sqrt(2 * hidden) * 2 (~68 for SmolLM2): tau 60 acts on some
    taus = {layer: 2.0 * (2 * hidden) ** 0.5 * 0.88 for layer in layers}
    out: dict = {path: {name: {} for name in configs} for path in ("graph", "op")}
    out["entry_ms"] = {}

    def rerun(h, r):  # a stand-in: the layer's own cost is the model's
        return h.clone(), r.clone()

    for b in batches:
        prompt = np.full(b, 16)
        states = [tuple((torch.randn(b, hidden, generator=gen) * 2).to(dtype)
                        for _ in range(2)) for _ in layers]
        # one runtime per engine for every configuration, so one compiled graph serves them
        # all; static shapes (vLLM traces the batch dimension dynamically; here that compile
        # did not finish in 20 minutes)
        runtimes = {loop: TelltaleRuntime(engine, num_layers, hidden, dtype=dtype,
                                          max_num_seqs=b * len(configs), max_num_tokens=b,
                                          max_len=1024) for loop, engine in engines.items()}
        torch._dynamo.reset()  # without guards, the last batch's graph would be reused
        compiled = {loop: _compile_layers(runtime, layers) for loop, runtime in runtimes.items()}
        # Entering a compiled graph costs a few dozen microseconds (dynamo's and AOT's
        # wrappers, outputs): an engine pays it once per forward with or without the
        # plugin, so the graph path is timed net of an identity graph on the same inputs.
        entry = torch.compile(lambda inputs: [(h, r) for h, r in inputs], fullgraph=True,
                              dynamic=False, options=vllm_compile_options())
        times = {(path, name): [] for path in ("graph", "op") for name in configs}
        times["entry", ""] = []

        def step(path: str, name: str, index: int) -> float:
            if path == "entry":
                start = time.perf_counter()
                entry(states)
                return time.perf_counter() - start
            loop = path == "op" or configs[name]["telltale_method"] == "loop"
            runtime = runtimes[loop]
            extra = request_args(configs[name], taus)
            req_ids = [f"{name}-{i}" for i in range(b)]
            scheduled, computed = np.ones(b, dtype=np.int64), prompt + index
            # the layers' outputs, which the op and loop edit in place (copied untimed)
            edited = [(h.clone(), r.clone()) for h, r in states]
            start = time.perf_counter()
            runtime.begin_step(req_ids, scheduled, computed, prompt,
                               lambda rid: (extra, None, 0))
            if path == "op":
                for layer, (h, r) in zip(layers, edited):
                    runtime.on_layer(layer, h, r, rerun)
            else:
                outputs = compiled[loop](states)
                # loop's op follows the traced step only where loop may run: an engine
                # whose requests may not loop has no op (README, "How it works")
                if loop:
                    for layer, (h, r), (_, _, gate) in zip(layers, edited, outputs):
                        runtime.loop_layer(layer, h, r, gate, rerun)
            runtime.end_step()
            return time.perf_counter() - start

        order = list(times)
        turns = random.Random(b)
        for index in range(steps + steps // 4):
            turns.shuffle(order)  # no configuration always follows the same one
            for path, name in order:
                spent = step(path, name, index)
                if index >= steps // 4:  # after a warm-up (compilation, first buffers)
                    times[path, name].append(spent)
        quartile = {key: 1000 * float(np.percentile(spent, 25))
                    for key, spent in times.items()}
        out["entry_ms"][b] = quartile.pop(("entry", ""))
        for (path, name), ms in quartile.items():
            out[path][name][b] = ms - (out["entry_ms"][b] if path == "graph" else 0.0)
    return out


def _compile_layers(runtime, layers: list[int]):
    """`runtime`'s step of every patched layer, traced by torch.compile as vLLM does."""
    import types

    import torch

    def traced(inputs):
        return [runtime.layer_step(layer, h, r) for layer, (h, r) in zip(layers, inputs)]

    # without guards, dynamo reuses the graph of the first function with the same code, so
    # each runtime's function gets a code object of its own
    code = traced.__code__.replace(co_name=f"traced_{id(runtime)}")
    return torch.compile(types.FunctionType(code, traced.__globals__, closure=traced.__closure__),
                         fullgraph=True, dynamic=False, options=vllm_compile_options())


if __name__ == "__main__":
    import argparse

    from telltale_norm.models import default_model_dir
    from vectorised_steps import step_benchmark

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"comma-separated configurations (default: all of {list(CONFIGS)})")
    parser.add_argument("--no-steps", action="store_true",
                        help="skip ERSS's and LRS's vectorised-against-loop timings")
    args = parser.parse_args()
    unknown = set(args.configs.split(",")) - set(CONFIGS)
    if unknown:
        parser.error(f"--configs: unknown {sorted(unknown)}; allowed: {list(CONFIGS)}")
    chosen = {name: CONFIGS[name] for name in args.configs.split(",")}
    batches = [int(b) for b in args.batches.split(",")]
    model = str(default_model_dir())
    cores = pin_to_engine_cores(model)
    report = {"engine_cores": cores,
              "runtime": runtime_benchmark(model, batches, configs=chosen)}
    if not args.no_steps:
        report["steps"] = step_benchmark(batches)
    print(json.dumps(report, indent=2))
