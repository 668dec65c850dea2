"""A plain vLLM user script (no telltale-norm import): greedy generation, token ids as JSON.

    python tests/scripts/generate.py MODEL [--max-tokens N] [--dtype D] [--prompt TEXT ...]

Prints one line `TOKENS [[...], ...]` on stdout (vLLM's own logging may surround it). Whatever
telltale-norm does happens through the `vllm.general_plugins` entry point and the environment.
"""

from __future__ import annotations

import argparse
import atexit
import json
import time

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea:",
    "1, 2, 3, 4,",
    "Question: what is 17 + 25? Answer:",
]


def clock(label: str) -> None:
    print(f"{label} {time.monotonic():.3f} {time.process_time():.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prompt", action="append", default=None)
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    # For tests that time how fast a bad setting stops the engine (imports excluded): the
    # wall clock and this process's CPU time at `LLM(...)` and at exit (also after an error).
    clock("ENGINE_START")
    atexit.register(clock, "EXIT")
    llm = LLM(model=args.model, enforce_eager=True, dtype=args.dtype, max_model_len=512,
              gpu_memory_utilization=0.2, seed=0, max_num_seqs=32)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    outputs = llm.generate(args.prompt or PROMPTS, params, use_tqdm=False)
    print("TOKENS " + json.dumps([list(o.outputs[0].token_ids) for o in outputs]), flush=True)


if __name__ == "__main__":
    main()
