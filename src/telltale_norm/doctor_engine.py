"""`telltale-norm doctor --engine MODEL`: the plugin in a real engine on this machine's device.

Starts the default compiled engine (CUDA graphs as vLLM sets them on a GPU) with
`VLLM_PATCH=monitor` and loop allowed (`TELLTALE_ALLOW_LOOP=1`), checks each behaviour below with
per-request settings, then starts the same engine without the plugin for the throughput
ratio. Each check prints PASS or FAIL:
- the plugin's start line (layers wrapped, compiled or eager);
- the CUDA-graph mode in force, and the graph split at the plugin's op where it must be;
- monitor counts every decode token;
- suppress at tau 0 changes the output, and at tau 1e30 equals off;
- forced loop re-runs happen, and a huge tau equals off;
- decode tokens/s with the plugin relative to the plain engine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import telltale_norm
from telltale_norm.config import TelltaleConfig
from telltale_norm.demo import engine
from telltale_norm.doctor import Check

PROMPTS = ("The capital of France is", "1, 2, 3, 4, 5,", "Once upon a time, there",
           "def fibonacci(n):")
THROUGHPUT_PROMPTS = 16  # requests in the timed batch


def _pass(ok: bool, what: str, fix: str = "") -> Check:
    return Check("PASS" if ok else "FAIL", what, "" if ok else fix)


def _tokens(llm: Any, prompts: Any, max_tokens: int, **extra: Any) -> list[list[int]]:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                            extra_args=extra or None)
    return [list(o.outputs[0].token_ids) for o in llm.generate(list(prompts), params,
                                                               use_tqdm=False)]


def _tokens_per_s(llm: Any, max_tokens: int) -> float:
    prompts = [PROMPTS[i % len(PROMPTS)] + f" ({i})" for i in range(THROUGHPUT_PROMPTS)]
    _tokens(llm, prompts[:2], 4)  # warm
    start = time.perf_counter()
    outputs = _tokens(llm, prompts, max_tokens)
    return sum(map(len, outputs)) / (time.perf_counter() - start)


def _graph_check(llm: Any) -> Check:
    from telltale_norm.vllm_adapter.op import OP_NAME

    cc = llm.llm_engine.vllm_config.compilation_config
    mode, graphs = cc.mode.name, cc.cudagraph_mode.name
    if graphs == "NONE":
        return _pass(True, f"CUDA graphs: NONE (compilation mode {mode}; the plugin's step runs "
                           "on every step)")
    split = OP_NAME in (cc.splitting_ops or [])
    return _pass(split, f"CUDA graphs: {graphs}, compilation mode {mode}, graph split at "
                        f"{OP_NAME}: {'yes' if split else 'no'}",
                 "the op must be a splitting op under CUDA graphs (see docs/DEPLOYMENT.md)")


def _behaviour_checks(llm: Any, layers: list[int], n: int) -> list[Check]:
    def taus(value: float) -> str:
        return json.dumps({str(layer): value for layer in layers})

    off = _tokens(llm, PROMPTS, n, telltale_method="off")
    telltale_norm.reset_stats(llm)
    monitor = _tokens(llm, PROMPTS, n, telltale_method="monitor")
    per_layer = telltale_norm.stats(llm)["per_layer"]
    counted = {int(layer): entry["tokens"] for layer, entry in per_layer.items()}
    want = len(PROMPTS) * (n - 1)  # the first token of each request comes from its prefill
    checks = [_pass(monitor == off and all(counted.get(layer) == want for layer in layers),
                    f"monitor: {want} decode tokens counted on each of layers {layers} "
                    f"(counted {sorted(set(counted.values()))}), output unchanged",
                    "the plugin's step does not run on every decode token")]
    suppress0 = _tokens(llm, PROMPTS, n, telltale_method="suppress", telltale_tau_json=taus(0))
    suppress_huge = _tokens(llm, PROMPTS, n, telltale_method="suppress",
                            telltale_tau_json=taus(1e30))
    checks.append(_pass(suppress0 != off and suppress_huge == off,
                        "suppress: tau 0 changes the output, tau 1e30 equals off",
                        "edits do not reach the model, or reach it where they must not"))
    telltale_norm.reset_stats(llm)
    _tokens(llm, PROMPTS, n, telltale_method="loop", telltale_tau_json=taus(1e-3),
            telltale_blowup=1e30, telltale_growth_eps=-1e30)
    reruns = sum(e["reruns"] for e in telltale_norm.stats(llm)["per_layer"].values())
    loop_huge = _tokens(llm, PROMPTS, n, telltale_method="loop", telltale_tau_json=taus(1e30))
    checks.append(_pass(reruns > 0 and loop_huge == off,
                        f"loop: forced re-runs happen ({reruns} token re-runs), tau 1e30 "
                        "equals off", "re-runs do not happen, or change what they must not"))
    return checks


def engine_checks(model: Path, args: argparse.Namespace) -> list[Check]:
    """Every check of this module on `model` (compiled unless `args.eager`)."""
    options = dict(compile=not args.eager, dtype=args.dtype,
                   gpu_memory_utilization=args.gpu_memory_utilization, verbose=args.verbose)
    n = args.max_tokens
    layers = TelltaleConfig.from_env().layers  # the environment's PATCHED_LAYERS, if any
    with engine(model, method="monitor", layers=layers, allow_loop=True, **options) as llm:
        stats = telltale_norm.stats(llm)
        checks = [_pass(bool(stats.get("start_line")), "plugin start line: "
                        + (stats.get("start_line") or "none"),
                        "the plugin did not attach to the model (is it installed?)"),
                  _graph_check(llm)]
        checks += _behaviour_checks(llm, list(stats["patched_layers"]), n)
        patched = _tokens_per_s(llm, n)
    with engine(model, method="off", **options) as llm:
        plain = _tokens_per_s(llm, n)
    ratio = patched / plain
    checks.append(_pass(ratio >= args.min_ratio,
                        f"decode throughput with the plugin (monitor): {patched:.1f} tokens/s, "
                        f"{ratio:.2f}x the plain engine's {plain:.1f} ({THROUGHPUT_PROMPTS} "
                        f"requests x {n} tokens; at least {args.min_ratio:g}x passes)",
                        "see docs/BENCHMARKS.md for what costs where"))
    return checks
