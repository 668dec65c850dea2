"""The suppression ablation (`suppress`) inside an lm-eval evaluation, from Python.

    python lm_eval_adapters/vllm_suppress.py [MODEL_DIR] [LIMIT]

Same as `VLLM_PATCH=suppress python -m lm_eval --model vllm ...`: high-norm tokens of the
late layers are scaled by 0.1. Without a model directory it uses SmolLM2-135M-Instruct.
"""

import sys

import lm_eval
from lm_eval.models.vllm_causallms import VLLM
from lm_eval.tasks import TaskManager
from lm_eval.utils import make_table

import telltale_norm
from telltale_norm.models import default_model_dir
from telltale_norm.tasks import task_dir


def main() -> None:
    model_dir = sys.argv[1] if len(sys.argv) > 1 else default_model_dir()
    limit = int(sys.argv[2]) if len(sys.argv) > 2 else 20

    # Adaptive tau on the default late layers; a short warm-up so a small run gets past it.
    telltale_norm.configure(method="suppress", adaptive_warmup_steps=32,
                            suppress_mode="high_norm", suppress_action="mul")
    lm = VLLM(pretrained=str(model_dir), dtype="bfloat16", max_model_len=1024,
              gpu_memory_utilization=0.2, enforce_eager=True, batch_size="auto")
    results = lm_eval.simple_evaluate(model=lm, tasks=["telltale_wordproblems_easy"],
                                      task_manager=TaskManager(include_path=str(task_dir())),
                                      limit=limit)
    print(make_table(results))
    print({layer: entry["suppressed"]
           for layer, entry in telltale_norm.stats(lm.model)["per_layer"].items()})


# vLLM starts its engine processes by spawning, which imports this file again.
if __name__ == "__main__":
    main()
