"""Compiled engine start: plain vLLM against the patched engines, every start compiling.

    .venv/bin/python bench/start_time.py            # plain, monitor (step traced), loop
    .venv/bin/python bench/start_time.py --no-loop  # plain and monitor only

Each engine starts in a fresh process with vLLM's and inductor's compile caches off, one
after the other (never side by side), and the time to construct `LLM(...)` is reported with
its ratio to plain vLLM's. The target is a patched start within 1.2x of a plain one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from step_time import KV_CACHE_BYTES

ENGINES = {"plain": {}, "monitor": {"VLLM_PATCH": "monitor"}, "loop": {"VLLM_PATCH": "loop"}}
TARGET = 1.2
MARK = "telltale-start-s="


def start_once(model: str) -> float:
    """Seconds to construct a compiled engine in this process (the child's work)."""
    from vllm import LLM

    start = time.perf_counter()
    llm = LLM(model=model, dtype="bfloat16", max_model_len=1024,
              kv_cache_memory_bytes=KV_CACHE_BYTES, seed=0, max_num_seqs=64)
    started = time.perf_counter() - start
    llm.generate(["Hello"], use_tqdm=False)  # the engine works
    return started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory (default: the bundled SmolLM2)")
    parser.add_argument("--no-loop", action="store_true", help="skip the loop engine")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from telltale_norm.models import default_model_dir

    model = args.model or str(default_model_dir())
    if args.child:
        print(f"{MARK}{start_once(model)}", flush=True)  # vLLM prints to stdout too
        return
    starts = {}
    for name, env in ENGINES.items():
        if name == "loop" and args.no_loop:
            continue
        child_env = {k: v for k, v in os.environ.items()
                     if k not in ("VLLM_PATCH", "TELLTALE_ALLOW_LOOP")}
        child_env.update(env, VLLM_DISABLE_COMPILE_CACHE="1",
                         TORCHINDUCTOR_FORCE_DISABLE_CACHES="1")
        done = subprocess.run([sys.executable, __file__, "--child", "--model", model],
                              env=child_env, capture_output=True, text=True)
        if done.returncode:
            tail = "\n".join(done.stderr.splitlines()[-20:])
            raise SystemExit(f"the {name} engine failed to start (exit {done.returncode}):\n"
                             f"{tail}")
        starts[name] = next(float(line[len(MARK):]) for line in done.stdout.splitlines()
                            if line.startswith(MARK))
        print(f"{name}: {starts[name]:.0f} s", file=sys.stderr, flush=True)
    plain = starts["plain"]
    print(json.dumps({name: {"start_s": round(s, 1), "ratio": round(s / plain, 3),
                             "target_met": name == "plain" or s / plain <= TARGET}
                      for name, s in starts.items()}, indent=2))


if __name__ == "__main__":
    main()
