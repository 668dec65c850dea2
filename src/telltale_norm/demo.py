"""The demo job: every method side by side on bundled arithmetic word problems, in one engine.

One engine starts with `monitor` and tracing on; each method is then chosen per request
(`telltale_method`), so the baseline and every method share one ~30 s start. The monitor run
comes first: it is the baseline that calibrates tau (a quantile of its decode-token norms per
layer), which the other methods receive per request as `telltale_tau_json`.

The problems and their scoring are in `problems.py`; the engine in `local_engine.py`.
"""

from __future__ import annotations

import json
import math
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import telltale_norm
from telltale_norm.config import normalize_method
from telltale_norm.local_engine import (GPU_MEMORY_UTILIZATION, UserError, engine,
                                        progress_bar, resolve_model)
from telltale_norm.problems import (Problem, chat_prompts, last_number, load_problems,
                                    wilson_interval)
from telltale_norm.thresholds import load_calibrated_tau
from telltale_norm.traces import RequestTrace

DEMO_METHODS = ("off", "monitor", "suppress", "loop", "ttts", "rerank")
QUICK_SIZE = (12, 96)  # (problems, tokens per answer) of `demo --quick`: minutes on 2 cores
FULL_SIZE = (64, 256)
# Methods that act on tau; they receive the calibrated tau per request.
TAU_METHODS = ("suppress", "loop", "ttts", "rerank")
# Per-layer counters of interventions in `telltale_norm.stats` (those the engine reports).
INTERVENTION_COUNTERS = ("suppressed", "reruns", "injections")
PLOT_PROBLEM = 0  # the problem whose traces the demo's PNG shows


# ---------------------------------------------------------------- the demo


@dataclass
class MethodResult:
    method: str
    status: str = "ok"  # or "unavailable"
    reason: str = ""
    correct: int = 0
    total: int = 0
    ci: tuple[float, float] = (0.0, 1.0)
    tokens: int = 0
    wall_s: float = 0.0
    interventions: int = 0
    answers: list[dict[str, Any]] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


@dataclass(frozen=True)
class DemoOptions:
    model: str | None = None
    methods: tuple[str, ...] = DEMO_METHODS
    n_problems: int = QUICK_SIZE[0]
    max_tokens: int = QUICK_SIZE[1]
    out: Path | None = None
    compile: bool = False
    dtype: str = "auto"
    gpu_memory_utilization: float = GPU_MEMORY_UTILIZATION
    seed: int = 0
    rerank_k: int = 4
    rerank_temperature: float = 0.7
    tau_q: float = 0.9
    verbose: bool = False


def parse_methods(text: str) -> tuple[str, ...]:
    """`off,monitor,...` -> canonical method names (aliases such as rr accepted)."""
    methods = []
    for name in text.split(","):
        try:
            methods.append(normalize_method(name))
        except ValueError as err:
            raise UserError(f"--methods: unknown method {name.strip()!r}; {err}") from None
    return tuple(dict.fromkeys(methods))


class Unavailable(Exception):
    """A method this build of telltale-norm does not offer yet."""


def _rerank_select() -> Callable[..., list[Any]]:
    try:
        from telltale_norm.rerank import select
    except ImportError as err:
        raise Unavailable(f"telltale_norm.rerank.select is not available ({err})") from None
    return select


def _interventions(stats: dict[str, Any]) -> int:
    return sum(int(entry.get(key) or 0) for entry in stats.get("per_layer", {}).values()
               for key in INTERVENTION_COUNTERS)


def run_method(llm: Any, method: str, prompts: list[str], problems: list[Problem],
               options: DemoOptions, tau_json: str | None
               ) -> tuple[MethodResult, dict[int, RequestTrace]]:
    """Run all prompts under `method`; returns its scores and each problem's trace."""
    from vllm import SamplingParams

    extra: dict[str, Any] = {"telltale_method": method}
    if method in TAU_METHODS:
        extra["telltale_tau_json"] = tau_json
    if method == "rerank":
        select = _rerank_select()
        params = SamplingParams(n=options.rerank_k, temperature=options.rerank_temperature,
                                seed=options.seed, max_tokens=options.max_tokens,
                                extra_args=extra)
    else:
        params = SamplingParams(temperature=0.0, max_tokens=options.max_tokens,
                                extra_args=extra)

    telltale_norm.reset_stats(llm)
    start = time.perf_counter()
    try:
        outputs = llm.generate(prompts, params, use_tqdm=progress_bar(method))
    except ValueError as err:  # the engine rejects a method it does not implement
        if method in str(err):
            raise Unavailable(str(err).splitlines()[0]) from None
        raise
    chosen = ([s.output for s in select(llm, outputs)] if method == "rerank"
              else [o.outputs[0] for o in outputs])
    wall = time.perf_counter() - start
    stats = telltale_norm.stats(llm)

    result = MethodResult(method, total=len(problems), wall_s=wall,
                          tokens=sum(len(c.token_ids) for o in outputs for c in o.outputs),
                          interventions=_interventions(stats))
    for i, (problem, completion) in enumerate(zip(problems, chosen)):
        predicted = last_number(completion.text)
        ok = predicted is not None and math.isclose(predicted, problem.expected, abs_tol=1e-6)
        result.correct += ok
        result.answers.append({"problem": i, "predicted": predicted, "correct": ok,
                               "candidate": completion.index, "text": completion.text})
    result.ci = wilson_interval(result.correct, result.total)

    # Each problem's trace of the scored answer (rerank: of the selected candidate).
    problem_of = {o.request_id: i for i, o in enumerate(outputs)}
    traces = {}
    for trace in telltale_norm.traces(llm):
        i = problem_of.get(trace.request_id)
        if i is not None and trace.index == result.answers[i]["candidate"]:
            traces[i] = trace
    return result, traces


def format_table(results: Sequence[MethodResult]) -> str:
    """The results as one aligned plain-text table (numbers right-aligned)."""
    header = ("method", "status", "accuracy [95% CI]", "correct", "tokens", "wall s",
              "interventions")
    rows = []
    for r in results:
        if r.status != "ok":
            rows.append((r.method, r.status, "-", "-", "-", "-", "-"))
            continue
        rows.append((r.method, r.status,
                     f"{100 * r.accuracy:.1f}% [{100 * r.ci[0]:.1f}, {100 * r.ci[1]:.1f}]",
                     f"{r.correct}/{r.total}", str(r.tokens), f"{r.wall_s:.1f}",
                     str(r.interventions)))
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                         for i, (cell, w) in enumerate(zip(row, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def run_demo(options: DemoOptions) -> Path:
    """Run the demo, print the table and write results.json, traces.json and a PNG into
    `options.out`. Returns that folder."""
    from telltale_norm.plot import plot_traces

    out = options.out or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    problems, source = load_problems(options.n_problems, options.seed)
    model = resolve_model(options.model)
    out.mkdir(parents=True, exist_ok=True)
    print(f"model: {model}\nproblems: {source}")

    results: dict[str, MethodResult] = {}
    traces: dict[str, dict[int, RequestTrace]] = {}
    with engine(model, compile=options.compile, dtype=options.dtype,
                max_model_len=max(1024, options.max_tokens + 512),
                gpu_memory_utilization=options.gpu_memory_utilization,
                verbose=options.verbose, method="monitor", trace=True,
                allow_loop="loop" in options.methods) as llm:
        prompts = chat_prompts(llm, [p.question for p in problems])
        # The baseline with monitor traces first: its norms calibrate tau for the others.
        results["monitor"], traces["monitor"] = run_method(llm, "monitor", prompts, problems,
                                                           options, None)
        calibration_path = out / "calibration.json"
        calibration_path.write_text(json.dumps(telltale_norm.calibration(llm), indent=2))
        tau = load_calibrated_tau(calibration_path, options.tau_q)
        tau_json = json.dumps({str(layer): round(value, 4) for layer, value in tau.items()})
        print(f"tau per layer = q{options.tau_q:g} of the baseline (monitor) run's decode-token "
              f"norms, passed per request as telltale_tau_json to "
              f"{', '.join(m for m in options.methods if m in TAU_METHODS) or 'no method'}:\n"
              f"  {tau_json}")
        for method in options.methods:
            if method in results:
                continue
            try:
                results[method], traces[method] = run_method(llm, method, prompts, problems,
                                                             options, tau_json)
            except Unavailable as err:
                results[method] = MethodResult(method, status="unavailable", reason=str(err))

    shown = [results[m] for m in options.methods]
    print()
    print(format_table(shown))
    print("  tokens: all generated tokens (rerank: all candidates); interventions: decode tokens "
          "x layers suppressed, re-run or injected")
    for r in shown:
        if r.status != "ok":
            print(f"  {r.method}: {r.reason}")

    trace_dicts = [{**trace.to_dict(), "request_id": f"problem-{i}", "method": method}
                   for method, per_problem in traces.items() if method in options.methods
                   for i, trace in sorted(per_problem.items())]
    (out / "traces.json").write_text(json.dumps({"traces": trace_dicts}))
    plotted = [(m, traces[m][PLOT_PROBLEM]) for m in options.methods
               if PLOT_PROBLEM in traces.get(m, {})]
    png = out / "norm_trace.png"
    if plotted:
        plot_traces([t for _, t in plotted], png, labels=[m for m, _ in plotted],
                    title=textwrap.shorten(f"problem {PLOT_PROBLEM}: "
                                           f"{problems[PLOT_PROBLEM].question}", 110))
    (out / "results.json").write_text(json.dumps({
        "model": str(model), "problems_source": source, "options": {
            k: v for k, v in asdict(options).items() if k != "out"},
        "patched_layers": sorted(tau), "tau": {str(k): v for k, v in tau.items()},
        "tau_source": f"q{options.tau_q:g} of the monitor run (calibration.json)",
        "problems": [asdict(p) for p in problems],
        "methods": [asdict(r) for r in shown],
    }, indent=2))
    print(f"\nwrote {out}/: results.json (table and answers), traces.json (norm traces; "
          f"plot one with `telltale-norm plot {out}/traces.json --request problem-N`), "
          + (f"{png.name} (problem {PLOT_PROBLEM})" if plotted else
             "no PNG (none of these methods is traced)")
          + ", calibration.json (tau source)")
    return out
