"""`telltale-norm doctor --engine MODEL`: the plugin in a real engine on this machine's device.

Starts the default compiled engine (CUDA graphs as vLLM sets them on a GPU) three times:
without the plugin, with `VLLM_PATCH=monitor` (the plugin's step traced into the graph) and
with `VLLM_PATCH=loop` (loop's op at the patched layers), and checks each behaviour below
with per-request settings. Each check prints PASS or FAIL:
- each patched engine's start line (layers wrapped, compiled or eager, traced or op);
- the CUDA-graph mode in force: as the plain engine's without loop, cut at loop's op with it;
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
from telltale_norm.local_engine import engine
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


def _graph_check(llm: Any, plain_mode: str, loop: bool) -> Check:
    """Without loop the step is in the graph and CUDA graphs stay as vLLM sets them; with
    loop, graphs (if any) are cut at loop's op."""
    from telltale_norm.vllm_adapter.op import OP_NAME

    cc = llm.llm_engine.vllm_config.compilation_config
    mode, graphs = cc.mode.name, cc.cudagraph_mode.name
    split = OP_NAME in (cc.splitting_ops or [])
    if not loop:
        return _pass(graphs == plain_mode and not split,
                     f"CUDA graphs: {graphs} (plain engine: {plain_mode}), compilation mode "
                     f"{mode}: the plugin's step is in the graph, no split at {OP_NAME}",
                     "the plugin changed the CUDA-graph settings without loop")
    return _pass(graphs == "NONE" or split,
                 f"with loop: CUDA graphs {graphs}, compilation mode {mode}, graph split at "
                 f"{OP_NAME}: {'yes' if split else 'no'}",
                 "loop's op must be a splitting op under CUDA graphs (docs/DEPLOYMENT.md)")


def _start_check(llm: Any) -> Check:
    line = telltale_norm.stats(llm).get("start_line")
    return _pass(bool(line), "plugin start line: " + (line or "none"),
                 "the plugin did not attach to the model (is it installed?)")


def _taus(layers: list[int], value: float) -> str:
    return json.dumps({str(layer): value for layer in layers})


def _monitor_and_suppress(llm: Any, layers: list[int], n: int) -> list[Check]:
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
    suppress0 = _tokens(llm, PROMPTS, n, telltale_method="suppress",
                        telltale_tau_json=_taus(layers, 0))
    suppress_huge = _tokens(llm, PROMPTS, n, telltale_method="suppress",
                            telltale_tau_json=_taus(layers, 1e30))
    checks.append(_pass(suppress0 != off and suppress_huge == off,
                        "suppress: tau 0 changes the output, tau 1e30 equals off",
                        "edits do not reach the model, or reach it where they must not"))
    return checks


def _loop(llm: Any, layers: list[int], n: int) -> Check:
    off = _tokens(llm, PROMPTS, n, telltale_method="off")
    telltale_norm.reset_stats(llm)
    _tokens(llm, PROMPTS, n, telltale_method="loop", telltale_tau_json=_taus(layers, 1e-3),
            telltale_blowup=1e30, telltale_growth_eps=-1e30)
    reruns = sum(e["reruns"] for e in telltale_norm.stats(llm)["per_layer"].values())
    huge = _tokens(llm, PROMPTS, n, telltale_method="loop",
                   telltale_tau_json=_taus(layers, 1e30))
    return _pass(reruns > 0 and huge == off,
                 f"loop: forced re-runs happen ({reruns} token re-runs), tau 1e30 equals off",
                 "re-runs do not happen, or change what they must not")


def engine_checks(model: Path, args: argparse.Namespace) -> list[Check]:
    """Every check of this module on `model` (compiled unless `args.eager`): the plain
    engine, the patched engine (monitor: the step in the graph), the loop engine."""
    options = dict(compile=not args.eager, dtype=args.dtype,
                   gpu_memory_utilization=args.gpu_memory_utilization, verbose=args.verbose)
    n = args.max_tokens
    layers = TelltaleConfig.from_env().layers  # the environment's PATCHED_LAYERS, if any
    with engine(model, method="off", **options) as llm:
        plain = _tokens_per_s(llm, n)
        plain_mode = llm.llm_engine.vllm_config.compilation_config.cudagraph_mode.name
    with engine(model, method="monitor", layers=layers, **options) as llm:
        patched_layers = list(telltale_norm.stats(llm)["patched_layers"])
        checks = [_start_check(llm), _graph_check(llm, plain_mode, loop=False),
                  *_monitor_and_suppress(llm, patched_layers, n)]
        patched = _tokens_per_s(llm, n)
    with engine(model, method="loop", layers=layers, **options) as llm:
        checks += [_start_check(llm), _graph_check(llm, plain_mode, loop=True),
                   _loop(llm, patched_layers, n)]
    ratio = patched / plain
    checks.append(_pass(ratio >= args.min_ratio,
                        f"decode throughput with the plugin (monitor): {patched:.1f} tokens/s, "
                        f"{ratio:.2f}x the plain engine's {plain:.1f} ({THROUGHPUT_PROMPTS} "
                        f"requests x {n} tokens; at least {args.min_ratio:g}x passes)",
                        "see docs/BENCHMARKS.md for what costs where"))
    return checks
