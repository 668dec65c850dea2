"""Soak test: many requests of random lengths, aborts mid-decode and forced preemption.

    .venv/bin/python bench/soak.py                   # 2,000 requests per phase (hours)
    .venv/bin/python bench/soak.py --requests 280 --warmup 60   # 2,380 requests (20-40 min)

One engine (VLLM_PATCH=monitor, PATCHED_LAYERS=1,2, TELLTALE_ALLOW_LOOP=1, a tiny random
fp32 Llama) runs one phase per method (every request of a phase picks that method per
request, `telltale_method` off / monitor / suppress / loop / ttts / rerank, with random
settings), then a phase that
mixes them all; before them, a warm-up runs `--warmup` requests of every phase in the same
order, so each method's buffers and shapes are met before memory is measured. Prompts have
4-120 tokens, outputs 1-128 tokens, half the requests are sampled with a seed, rerank
requests ask for n = 1-3 samples. The KV cache holds
12 blocks of 32 tokens (384 tokens) while up to 32 requests of up to 248 tokens run at once,
so the scheduler preempts and recomputes requests all the time. About 15% of the requests
are aborted in the middle of their decoding. Then the same requests run on an engine with
the plugin off (VLLM_PATCH unset), as the memory control.

Checked, and the exit status is 1 if any check fails:
- no crash (the engine survives every phase);
- the live per-request state returns to 0 after every phase (`telltale_norm.stats`:
  live_requests, live_banks, rejected_requests, and traces_waiting once the traces are
  taken, as a caller of `telltale_norm.traces` does);
- preemptions happened in every phase (vLLM's `vllm:num_preemptions` counter);
- the worker's memory in use is flat after warm-up: its RSS after `malloc_trim` (sampled
  every 25 requests) may grow from the end of the warm-up to the end of the run by at most
  `--rss-tolerance-mib` more than it grows with the plugin off. Raw RSS is reported too.

Also used by tests/test_reliability.py (a 60-request version of one phase).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

METHODS = ("off", "monitor", "suppress", "loop", "ttts", "rerank")
PHASES = METHODS + ("mixed",)
WARMUP = "warm-up "  # prefix of the warm-up phases: one per measured phase, not measured
LAYERS = (1, 2)

# Small enough that requests are preempted constantly (12 blocks x 32 tokens = 384 tokens of
# KV cache for up to 32 running requests), large enough for one max-length request.
ENGINE_ARGS = dict(enforce_eager=True, dtype="float32", max_model_len=256, block_size=32,
                   num_gpu_blocks_override=12, kv_cache_memory_bytes=32 << 20,
                   gpu_memory_utilization=0.2, seed=0, max_num_seqs=32,
                   # a seeded request must be prefilled in one chunk on the CPU backend
                   max_num_batched_tokens=2048, disable_log_stats=False)
ENGINE_ENV = {"VLLM_PATCH": "monitor", "PATCHED_LAYERS": ",".join(map(str, LAYERS)),
              "TELLTALE_ALLOW_LOOP": "1"}  # every method per request, loop included


# ---------------------------------------------------------------- engine helpers
def worker_processes():
    """The engine's worker processes (descendants of this process named VLLM::Worker*)."""
    import psutil

    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "Worker" in proc.name() or any("VLLM::Worker" in a for a in proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def worker_rss() -> int:
    """Resident memory of the worker process(es), bytes."""
    import psutil

    total = 0
    for proc in worker_processes():
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


def worker_live_rss(llm) -> int:
    """Resident memory of the worker(s) after glibc returned its free heap to the system.

    Raw RSS also holds memory the allocator keeps after it was freed (arenas of finished
    threads, fragmented heap) and grows with it; `malloc_trim(0)` hands that back first, so
    what remains is memory in use. Needs VLLM_ALLOW_INSECURE_SERIALIZATION=1 (a callable
    sent to the workers); nested, so cloudpickle sends it by value.
    """

    def trimmed_rss(_worker) -> int:
        import ctypes
        import os

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    return sum(llm.collective_rpc(trimmed_rss))


def preemptions(llm) -> int:
    """vLLM's preemption counter (needs `disable_log_stats=False`)."""
    return int(sum(getattr(m, "value", 0) for m in llm.get_metrics()
                   if m.name.startswith("vllm:num_preemptions")))


def flush(llm) -> None:
    """vLLM reports finished and aborted requests to the workers on the next step."""
    from vllm import SamplingParams

    llm.generate(["flush"], SamplingParams(max_tokens=1), use_tqdm=False)


def calibrate(llm, rng: np.random.Generator) -> dict[int, dict[str, float]]:
    """Percentiles of the decode norms on the patched layers (a short monitor run)."""
    import telltale_norm
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=random_prompt(rng, int(rng.integers(8, 40))))
               for _ in range(8)]
    llm.generate(prompts, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True,
                                         extra_args={"telltale_method": "monitor"}),
                 use_tqdm=False)
    record = telltale_norm.calibration(llm, list(LAYERS))["per_layer"]
    if not record:  # unpatched engine (--baseline): the settings are ignored anyway
        return {layer: {f"p{p}": 1.0 for p in (25, 50, 75, 90)} for layer in LAYERS}
    return {layer: record[str(layer)] for layer in LAYERS}


def random_prompt(rng: np.random.Generator, length: int) -> list[int]:
    return rng.integers(1000, 40000, size=length).tolist()


# ---------------------------------------------------------------- random requests
def tau_json(cal: dict[int, dict[str, float]], key: str) -> str:
    return json.dumps({str(layer): round(cal[layer][key], 4) for layer in LAYERS})


def random_settings(method: str, rng: np.random.Generator,
                    cal: dict[int, dict[str, float]]) -> dict[str, Any]:
    """Per-request `extra_args` for `method`, with randomly drawn settings."""
    pick = lambda *xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    args: dict[str, Any] = {"telltale_method": method}
    if method == "monitor":
        args["telltale_trace"] = pick(0, 1)
    elif method == "suppress":
        if rng.random() < 0.5:
            args.update(telltale_suppress_mode="random",
                        telltale_random_suppress_p=round(float(rng.uniform(0.05, 0.3)), 3),
                        telltale_random_seed=int(rng.integers(1 << 30)))
        else:
            args.update(telltale_tau_json=tau_json(cal, pick("p50", "p75", "p90")),
                        telltale_suppress_action=pick("mul", "clamp"))
    elif method == "loop":
        args.update(telltale_tau_json=tau_json(cal, pick("p25", "p50")),
                    telltale_blowup=pick(1.5, 10.0), telltale_growth_eps=pick(-1.0, 0.0, 0.2),
                    telltale_max_extra=int(rng.integers(1, 4)), telltale_alpha=pick(1.0, 0.5))
    elif method == "ttts":
        args.update(telltale_tau_json=tau_json(cal, pick("p50", "p75")),
                    telltale_low_k=int(rng.integers(1, 6)), telltale_gamma=pick(1.0, 2.0),
                    telltale_p_inject=pick(0.5, 1.0), telltale_cos_min=pick(-1.0, 0.0, 0.5),
                    telltale_cooldown=int(rng.integers(0, 8)),
                    telltale_bank_k=int(rng.integers(1, 9)),
                    telltale_random_seed=int(rng.integers(1 << 30)))
    elif method == "rerank":
        args.update(telltale_metric=pick("A", "B", "C", "D", "mean"),
                    telltale_tau_json=tau_json(cal, "p75"))
    if method != "off" and rng.random() < 0.3:
        args["telltale_layers"] = str(pick(1, 2))
        if "telltale_tau_json" in args:
            tau = json.loads(args["telltale_tau_json"])
            args["telltale_tau_json"] = json.dumps({args["telltale_layers"]:
                                                    tau[args["telltale_layers"]]})
    return args


@dataclass
class Planned:
    request_id: str
    prompt: list[int]
    params: Any  # SamplingParams
    abort_at: int | None  # abort once this many tokens were generated (None: run to the end)


def plan_requests(phase: str, n: int, rng: np.random.Generator,
                  cal: dict[int, dict[str, float]], abort_frac: float,
                  max_model_len: int) -> list[Planned]:
    from vllm import SamplingParams

    plans = []
    for i in range(n):
        kind = phase.removeprefix(WARMUP)  # a warm-up phase plans like the phase it warms
        method = kind if kind in METHODS else METHODS[int(rng.integers(len(METHODS)))]
        prompt_len = int(rng.integers(4, 121))
        max_tokens = int(rng.integers(1, min(129, max_model_len - prompt_len + 1)))
        samples = int(rng.integers(1, 4)) if method == "rerank" else 1
        sampled = samples > 1 or rng.random() < 0.5
        params = SamplingParams(
            max_tokens=max_tokens, n=samples, ignore_eos=True,
            temperature=0.8 if sampled else 0.0,
            seed=int(rng.integers(1 << 30)) if sampled else None,
            extra_args=random_settings(method, rng, cal))
        abort_at = None
        if max_tokens >= 3 and rng.random() < abort_frac:
            abort_at = int(rng.integers(1, max_tokens - 1))  # mid-decode: not done yet
        plans.append(Planned(f"{phase}-{i}", random_prompt(rng, prompt_len), params, abort_at))
    return plans


# ---------------------------------------------------------------- one phase
@dataclass
class PhaseResult:
    phase: str
    requests: int = 0
    finished: int = 0
    aborted: int = 0
    preemptions: int = 0
    tokens: int = 0
    seconds: float = 0.0
    # (requests done, worker RSS bytes, worker RSS bytes after malloc_trim)
    rss: list[tuple[int, int, int]] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)  # telltale stats after the phase
    traces_taken: int = 0

    def rss_mib(self, at: int, live: bool = True) -> float:
        """RSS sample `at` (0: start, -1: end) in MiB; `live`: after malloc_trim."""
        return self.rss[at][2 if live else 1] / 2**20

    def growth_mib(self, live: bool = True) -> float:
        return self.rss_mib(-1, live) - self.rss_mib(0, live)

    def to_dict(self) -> dict[str, Any]:
        return {**{k: v for k, v in self.__dict__.items() if k != "rss"},
                "rss": [list(sample) for sample in self.rss]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PhaseResult:
        return cls(**{**data, "rss": [tuple(sample) for sample in data["rss"]]})

    def live_ok(self) -> bool:
        """Every per-request state was freed (True on an unpatched engine)."""
        s = self.stats
        if s.get("method", "off") == "off":
            return True
        return (s.get("live_requests") == 0 and s.get("live_banks") == 0
                and s.get("traces_waiting") == 0 and s.get("rejected_requests") == 0)


def run_phase(llm, phase: str, n: int, rng: np.random.Generator,
              cal: dict[int, dict[str, float]], abort_frac: float = 0.15,
              max_inflight: int = 48, rss_every: int | None = 25) -> PhaseResult:
    """Run `n` requests of `phase` through `llm` with aborts; return what was observed.

    The worker's memory is sampled every `rss_every` requests (None: never)."""
    import telltale_norm
    from vllm.inputs import TokensPrompt

    engine = llm.llm_engine
    max_model_len = engine.vllm_config.model_config.max_model_len
    plans = plan_requests(phase, n, rng, cal, abort_frac, max_model_len)
    result = PhaseResult(phase, requests=n)
    preempted_before = preemptions(llm)
    start = time.perf_counter()
    pending = list(reversed(plans))
    inflight: dict[str, Planned] = {}
    sample_rss = lambda done: result.rss.append(  # noqa: E731
        (done, worker_rss(), worker_live_rss(llm))) if rss_every else None
    sample_rss(0)
    next_rss = rss_every or n + 1
    while pending or inflight:
        while pending and len(inflight) < max_inflight:
            plan = pending.pop()
            engine.add_request(plan.request_id, TokensPrompt(prompt_token_ids=plan.prompt),
                               plan.params)
            inflight[plan.request_id] = plan
        to_abort: list[str] = []
        for out in engine.step():  # an n > 1 request may appear once per sample
            plan = inflight.get(out.request_id)
            if plan is None:
                continue
            generated = max(len(c.token_ids) for c in out.outputs) if out.outputs else 0
            if out.finished:
                del inflight[out.request_id]
                result.finished += 1
                result.tokens += sum(len(c.token_ids) for c in out.outputs)
            elif (plan.abort_at is not None and generated >= plan.abort_at
                  and out.request_id not in to_abort):
                to_abort.append(out.request_id)
        to_abort = [r for r in to_abort if r in inflight]
        if to_abort:
            engine.abort_request(to_abort)
            for request_id in to_abort:
                del inflight[request_id]
            result.aborted += len(to_abort)
        done = result.finished + result.aborted
        if done >= next_rss:
            sample_rss(done)
            next_rss += rss_every
    flush(llm)
    result.traces_taken = len(telltale_norm.traces(llm))  # what a caller of traces() takes
    result.seconds = time.perf_counter() - start
    sample_rss(n)
    result.preemptions = preemptions(llm) - preempted_before
    result.stats = {k: v for k, v in telltale_norm.stats(llm).items() if k != "per_layer"}
    return result


# ---------------------------------------------------------------- report
def table(results: list[PhaseResult], baseline: list[PhaseResult] | None) -> str:
    head = ("| phase | requests | finished | aborted | preemptions | s | live_requests | "
            "live_banks | bank_bytes | traces taken / waiting | RSS start MiB | RSS end MiB | "
            "growth MiB | growth, plugin off MiB | raw RSS growth MiB | raw, plugin off MiB |")
    lines = [head, "|" + "|".join("---" for _ in range(head.count("|") - 1)) + "|"]
    for i, r in enumerate(results):
        s = r.stats
        base = baseline[i] if baseline else None
        off, off_raw = ((f"{base.growth_mib():+.1f}", f"{base.growth_mib(live=False):+.1f}")
                        if base else ("-", "-"))
        lines.append(
            f"| {r.phase} | {r.requests} | {r.finished} | {r.aborted} | {r.preemptions} | "
            f"{r.seconds:.0f} | {s.get('live_requests')} | {s.get('live_banks')} | "
            f"{s.get('bank_bytes')} | {r.traces_taken} / {s.get('traces_waiting')} | "
            f"{r.rss_mib(0):.1f} | {r.rss_mib(-1):.1f} | {r.growth_mib():+.1f} | "
            f"{off} | {r.growth_mib(live=False):+.1f} | {off_raw} |")
    return "\n".join(lines)


def growth_after_warmup(results: list[PhaseResult], live: bool = True) -> tuple[float, float]:
    """Worker RSS at the end of the warm-up and at the end of the run, MiB."""
    checked = [r for r in results if not r.phase.startswith(WARMUP)]
    return checked[0].rss_mib(0, live), checked[-1].rss_mib(-1, live)


def make_engine(model: str, baseline: bool = False):
    """The soak's engine; `baseline`: VLLM_PATCH unset (the plugin does nothing), to tell
    vLLM's own memory growth from the plugin's."""
    from vllm import LLM

    for key in ENGINE_ENV:
        os.environ.pop(key, None)
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # worker_live_rss sends a callable
    if not baseline:
        os.environ.update(ENGINE_ENV)
        from telltale_norm.vllm_adapter.plugin import register

        register()
    return LLM(model=model, **ENGINE_ARGS)


def soak(model: str, phases: list[str], requests: int, warmup: int, seed: int,
         abort_frac: float, baseline: bool) -> tuple[list[PhaseResult], str | None]:
    """One engine, a warm-up phase, then `phases`; returns the results and a crash message."""
    t0 = time.perf_counter()
    llm = make_engine(model, baseline)
    label = "plugin off (VLLM_PATCH unset)" if baseline else "VLLM_PATCH=monitor"
    print(f"[{label}] engine started in {time.perf_counter() - t0:.0f} s; worker pids "
          f"{[p.pid for p in worker_processes()]}", flush=True)
    rng = np.random.default_rng(seed)  # the same requests on both engines
    results: list[PhaseResult] = []
    crash = None
    try:
        cal = calibrate(llm, rng)
        for phase in [WARMUP + p for p in phases if warmup] + phases:
            result = run_phase(llm, phase, warmup if phase.startswith(WARMUP) else requests,
                               rng, cal, abort_frac)
            results.append(result)
            print(f"[{label}] {phase}: {result.finished} finished, {result.aborted} aborted, "
                  f"{result.preemptions} preemptions, {result.seconds:.0f} s, RSS "
                  f"{result.rss_mib(0):.1f} -> {result.rss_mib(-1):.1f} MiB, stats "
                  f"{json.dumps(result.stats)}", flush=True)
    except Exception as err:  # noqa: BLE001 - a crash is a result of the soak
        crash = f"{type(err).__name__}: {err}"
        print(f"[{label}] CRASH after {len(results)} phases: {crash}", flush=True)
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
    return results, crash


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per phase")
    parser.add_argument("--warmup", type=int, default=None,
                        help="requests of each warm-up phase (one per phase, run before "
                             "the measured phases; default: --requests)")
    parser.add_argument("--phases", default=",".join(PHASES),
                        help=f"comma-separated subset of {','.join(PHASES)}")
    parser.add_argument("--abort-frac", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", help="model directory (default: a tiny random Llama)")
    parser.add_argument("--rss-tolerance-mib", type=float, default=16.0,
                        help="allowed worker RSS growth after warm-up beyond the growth of "
                             "the same run with the plugin off")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the plugin-off run (then RSS growth is only reported)")
    parser.add_argument("--plugin-off", action="store_true",
                        help="run only the plugin-off control (in its own process)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        parser.error(f"unknown phases {unknown}; allowed: {', '.join(PHASES)}")
    warmup = args.requests if args.warmup is None else args.warmup

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tmp = None
    model = args.model
    if model is None:
        from telltale_norm.models import make_tiny_model

        tmp = tempfile.TemporaryDirectory(prefix="soak-")
        model = str(make_tiny_model(Path(tmp.name) / "tiny-llama", "llama"))

    t0 = time.perf_counter()
    if args.plugin_off:  # the control, in a process where the plugin was never activated
        results, crash = soak(model, phases, args.requests, warmup, args.seed,
                              args.abort_frac, baseline=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"crash": crash, "results": [
                r.to_dict() for r in results]}))
        return 1 if crash else 0
    results, crash = soak(model, phases, args.requests, warmup, args.seed, args.abort_frac,
                          baseline=False)
    baseline = None
    if not args.no_baseline:
        with tempfile.TemporaryDirectory(prefix="soak-control-") as control:
            out = Path(control) / "plugin_off.json"
            subprocess.run([sys.executable, __file__, "--plugin-off", "--model", model,
                            "--requests", str(args.requests), "--warmup", str(warmup),
                            "--phases", ",".join(phases), "--seed", str(args.seed),
                            "--abort-frac", str(args.abort_frac), "--json", str(out)],
                           check=False)
            if out.exists():
                data = json.loads(out.read_text())
                baseline = [PhaseResult.from_dict(r) for r in data["results"]]
                if data["crash"] or len(baseline) != len(results):
                    baseline = None  # vLLM itself failed: no memory comparison
    if tmp is not None:
        tmp.cleanup()

    checked = [r for r in results if not r.phase.startswith(WARMUP)]
    print()
    print(table(results, baseline))
    failures = []
    if crash:
        failures.append(f"crash: {crash}")
    failures += [f"{r.phase}: live state left {r.stats}" for r in results if not r.live_ok()]
    failures += [f"{r.phase}: no preemption" for r in checked if r.preemptions == 0]
    if checked:
        for live in (False, True):
            start, end = growth_after_warmup(results, live)
            line = (f"worker RSS{'' if live else ' (raw)'} after warm-up: {start:.1f} -> "
                    f"{end:.1f} MiB ({end - start:+.1f})")
            if baseline:
                base_start, base_end = growth_after_warmup(baseline, live)
                excess = (end - start) - (base_end - base_start)
                line += (f"; plugin off: {base_start:.1f} -> {base_end:.1f} MiB "
                         f"({base_end - base_start:+.1f}); due to the plugin {excess:+.1f} MiB")
                if live:
                    line += f" (tolerance {args.rss_tolerance_mib:g})"
                    if excess > args.rss_tolerance_mib:
                        failures.append(f"worker memory in use grew {excess:+.1f} MiB more "
                                        "than with the plugin off")
            print(line)
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "plugin": [r.to_dict() for r in results],
            "plugin_off": [r.to_dict() for r in baseline or []]}, indent=1))
    for failure in failures:
        print("FAIL:", failure)
    print("RESULT:", "FAIL" if failures else "PASS")
    return 1 if failures else 0


if __name__ == "__main__":  # vLLM starts worker processes (spawn)
    sys.exit(main())
