"""LRS (`rerank`, response selection) inside an lm-eval evaluation, from Python.

    python lm_eval_adapters/vllm_rerank.py [MODEL_DIR] [LIMIT]

Uses the `vllm_lrs` model type (registered by importing `telltale_norm.lm_eval`): each
question gets 4 sampled answers and lm-eval scores the one LRS selects. The report compares
that with a random candidate and a majority vote over the same candidates. On the command
line: python -m telltale_norm.lm_eval --model vllm_lrs --model_args ...,lrs_k=4 ...
"""

import json
import sys
import tempfile
from pathlib import Path

import lm_eval
from lm_eval.tasks import TaskManager
from lm_eval.utils import make_table

import telltale_norm.lm_eval  # noqa: F401  registers the vllm_lrs model type
from telltale_norm.models import default_model_dir
from telltale_norm.tasks import task_dir


def main() -> None:
    model_dir = sys.argv[1] if len(sys.argv) > 1 else default_model_dir()
    limit = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    report = Path(tempfile.mkdtemp()) / "lrs_report.json"

    results = lm_eval.simple_evaluate(
        model="vllm_lrs",
        model_args=f"pretrained={model_dir},dtype=bfloat16,max_model_len=1024,"
                   f"gpu_memory_utilization=0.2,enforce_eager=True,lrs_k=4,lrs_temperature=0.7,"
                   f"lrs_report={report}",
        tasks=["telltale_wordproblems_easy"],
        task_manager=TaskManager(include_path=str(task_dir())), batch_size="auto", limit=limit)
    print(make_table(results))
    print(json.dumps(json.loads(report.read_text())["summary"], indent=1))


# vLLM starts its engine processes by spawning, which imports this file again.
if __name__ == "__main__":
    main()
