"""lm-eval with telltale-norm: the bundled offline tasks and the `vllm_lrs` model type.

    python -m telltale_norm.lm_eval <lm-eval arguments>

is `python -m lm_eval <lm-eval arguments>` with two additions:

- Naming a bundled task (`telltale_wordproblems`, `telltale_wordproblems_easy`,
  `telltale_mc`, or the tag `telltale`) puts their folder (`telltale_norm.tasks.task_dir()`)
  on `--include_path`. When you pass an `--include_path` of your own, the bundled tasks are
  named by their YAML files instead (lm-eval takes one include path).
- `--model vllm_lrs` is lm-eval's `vllm` model with l2-guided response selection (LRS):
  every generation request samples `lrs_k` candidates (`--model_args ...,lrs_k=4,
  lrs_temperature=0.7`) and answers with the one `telltale_norm.rerank.select` picks.
  With `--output_path`, a report `lrs_report_<time>.json` is written there (or give
  `lrs_report=FILE`): per request the candidates, their scores and the chosen index, and
  per word-problem task the accuracy of the selection next to what a random candidate
  (expected value) and a majority vote over the same candidates would have scored.

`python -m telltale_norm.lm_eval --task_dir` prints the task folder, for plain `lm_eval`.
Importing this module registers `vllm_lrs` for `lm_eval.simple_evaluate` as well.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from lm_eval.__main__ import cli_evaluate
from lm_eval.api.registry import model_registry, register_model
from lm_eval.models.utils import maybe_truncate, postprocess_generated_text
from lm_eval.models.vllm_causallms import VLLM

from telltale_norm.config import TelltaleConfig
from telltale_norm.rerank import select
from telltale_norm.tasks import BUNDLED_TASKS, TAG, task_dir

__all__ = ["VLLMLRS", "extract_answer", "lrs_summary", "main", "with_bundled_tasks"]

# A child of lm-eval's logger, so messages appear with lm-eval's own (it configures only its
# logger, not the root).
logger = logging.getLogger("lm_eval.telltale_norm")

LRS_MODEL = "vllm_lrs"
_BUNDLED_NAMES = frozenset((*BUNDLED_TASKS, TAG))


# ---------------------------------------------------------------- answers of GSM8K-format tasks
_STRICT = re.compile(r"#### (-?[0-9.,]+)")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_answer(text: str) -> str | None:
    """The numeric answer of a GSM8K-style text: after "#### " if present, else its last
    number (lm-eval's "strict-match" then "flexible-extract"), in canonical form."""
    strict = _STRICT.search(text)
    numbers = [strict.group(1)] if strict else _NUMBER.findall(text)[-1:]
    if not numbers:
        return None
    try:
        value = float(numbers[0].replace(",", "").rstrip("."))
    except ValueError:
        return None
    return str(int(value)) if value.is_integer() else repr(value)


def _gold(doc: dict[str, Any]) -> str | None:
    answer = doc.get("answer")
    return extract_answer(answer) if isinstance(answer, str) and "####" in answer else None


# ---------------------------------------------------------------- the vllm_lrs model
class VLLMLRS(VLLM):
    """lm-eval's `vllm` model answering each generation request with the best of `lrs_k`
    sampled candidates by telltale-norm's response selection. Log-likelihood requests
    (multiple-choice tasks) are lm-eval's own.

    Needs the patched engine: with `VLLM_PATCH` off it switches on `monitor`, which changes no
    output. Each generation request asks for `telltale_method=rerank`, which replaces the
    engine's method for that request.
    """

    def __init__(self, pretrained: str, lrs_k: int = 4, lrs_temperature: float = 0.7,
                 lrs_report: str | None = None, **kwargs: Any) -> None:
        if int(lrs_k) < 2:
            raise ValueError(f"lrs_k={lrs_k}: allowed: an integer >= 2 (candidates per request)")
        if float(lrs_temperature) <= 0:
            raise ValueError(f"lrs_temperature={lrs_temperature}: allowed: > 0 (vLLM samples "
                             "n > 1 candidates only with a positive temperature)")
        if int(kwargs.get("data_parallel_size", 1)) > 1:
            raise ValueError("vllm_lrs needs the engine in this process: data_parallel_size=1")
        if not TelltaleConfig.from_env().active:
            logger.info("vllm_lrs: VLLM_PATCH is off; starting the engine with "
                        "VLLM_PATCH=monitor (scores norms, changes no output)")
            os.environ["VLLM_PATCH"] = "monitor"
        # vLLM loads plugins once per process: an engine made earlier with VLLM_PATCH off
        # left the frontend unpatched, so install it for this engine (idempotent).
        from telltale_norm.vllm_adapter.plugin import register

        register()
        super().__init__(pretrained, **kwargs)
        self.lrs_k = int(lrs_k)
        self.lrs_temperature = float(lrs_temperature)
        self.lrs_report = Path(lrs_report) if lrs_report else None
        # Selections by prompt tokens, until generate_until pairs them with their requests.
        self._pending: dict[tuple[int, ...], list[dict[str, Any]]] = defaultdict(list)
        self._rows: list[dict[str, Any]] = []

    def modify_gen_kwargs(self, gen_kwargs: dict[str, Any], eos: str | list[str] | None = None,
                          default_max_gen_toks: int = 256
                          ) -> tuple[dict[str, Any], list[str], int]:
        kwargs, until, max_gen_toks = super().modify_gen_kwargs(gen_kwargs, eos,
                                                                default_max_gen_toks)
        # Tasks ask for greedy decoding, which vLLM refuses with n > 1: sample instead.
        kwargs.update(n=self.lrs_k, temperature=self.lrs_temperature)
        kwargs["extra_args"] = {**(kwargs.get("extra_args") or {}), "telltale_method": "rerank"}
        return kwargs, until, max_gen_toks

    def _model_generate(self, requests: list[list[int]], generate: bool = False,
                        sampling_params: Any = None) -> Any:
        outputs = super()._model_generate(requests, generate, sampling_params)
        if not generate:
            return outputs
        for output, selection in zip(outputs, select(self.model, outputs), strict=True):
            candidates = sorted(output.outputs, key=lambda c: c.index)
            chosen = next(c for c in candidates if c.index == selection.index)
            # lm-eval answers with outputs[0].
            output.outputs = [chosen, *(c for c in candidates if c is not chosen)]
            self._pending[tuple(output.prompt_token_ids)].append({
                "chosen_index": selection.index,
                "metric": selection.metric,
                "candidates": [{"index": c.index, "text": c.text, "scores": score}
                               for c, score in zip(candidates, selection.scores, strict=True)],
            })
        return outputs

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        answers = super().generate_until(requests, disable_tqdm)
        # The end-of-text string as lm-eval's generate_until takes it (a stop string there).
        eos = self.tokenizer.decode(self.eot_token_id) or getattr(self.tokenizer, "eos_token",
                                                                   None)
        for request in requests:
            tokens, until = self._prompt(request, eos)
            row = self._pending[tokens].pop(0)
            for candidate in row["candidates"]:
                # The text lm-eval would have scored, had this candidate been chosen.
                candidate["text"] = postprocess_generated_text(candidate["text"], until,
                                                               self.think_end_token)
                candidate["answer"] = extract_answer(candidate["text"])
            self._rows.append({"task": request.task_name, "doc_id": request.doc_id,
                               "gold": _gold(request.doc), **row})
        self._report()
        return answers

    def _prompt(self, request: Any, eos: str | None) -> tuple[tuple[int, ...], list[str]]:
        """The prompt tokens generate_until sent for `request` (its context encoded and
        truncated exactly as lm-eval's VLLM.generate_until does) and its stop strings."""
        context, gen_kwargs = request.args
        _, until, max_gen_toks = self.modify_gen_kwargs(gen_kwargs, eos=eos,
                                                        default_max_gen_toks=self.max_gen_toks)
        tokens, _ = maybe_truncate(self.tok_encode(context), max_gen_toks=max_gen_toks,
                                   max_model_len=self.max_length, side=self.truncation_side,
                                   verbose=False)
        return tuple(tokens), until

    def _report(self) -> None:
        summary = lrs_summary(self._rows)
        for task, entry in summary.items():
            logger.info(
                "LRS %s: %d requests, %d candidates each (metric %s): selected %.3f, random "
                "candidate %.3f, majority vote %.3f, any candidate right %.3f", task,
                entry["requests"], self.lrs_k, entry["metric"], entry["selected"],
                entry["random"], entry["majority"], entry["oracle"])
        if self.lrs_report is None:
            return
        self.lrs_report.parent.mkdir(parents=True, exist_ok=True)
        self.lrs_report.write_text(json.dumps(
            {"lrs_k": self.lrs_k, "lrs_temperature": self.lrs_temperature,
             "summary": summary, "requests": self._rows}, indent=1, default=float))
        logger.info("LRS report written to %s", self.lrs_report)


def lrs_summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per task with gold answers: accuracy of the selected candidates, of a random one
    (expected value: the mean over candidates), of a majority vote over the candidates'
    answers (ties to the lowest candidate index; no answer never wins), and of an oracle
    that knows which candidate is right (any candidate right)."""
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["gold"] is not None:
            by_task[row["task"]].append(row)
    summary = {}
    for task, task_rows in by_task.items():
        selected = random = majority = oracle = 0.0
        for row in task_rows:
            right = [c["answer"] == row["gold"] for c in row["candidates"]]
            answers = Counter(c["answer"] for c in row["candidates"] if c["answer"] is not None)
            chosen = next(c for c in row["candidates"] if c["index"] == row["chosen_index"])
            selected += chosen["answer"] == row["gold"]
            random += sum(right) / len(right)
            majority += bool(answers) and answers.most_common(1)[0][0] == row["gold"]
            oracle += any(right)
        n = len(task_rows)
        summary[task] = {"requests": n, "metric": task_rows[0]["metric"],
                         "selected": selected / n, "random": random / n,
                         "majority": majority / n, "oracle": oracle / n}
    return summary


# Idempotent: one process may run this file as __main__ and also import it.
if LRS_MODEL not in model_registry:
    register_model(LRS_MODEL)(VLLMLRS)


# ---------------------------------------------------------------- the command line
def _options(argv: Sequence[str]) -> argparse.Namespace:
    # Only the lm-eval options this wrapper looks at; lm-eval parses the whole line itself.
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--tasks", "-t", nargs="+", default=[])
    parser.add_argument("--include_path")
    parser.add_argument("--model", "-M")
    parser.add_argument("--model_args", "-a", nargs="+", action="extend", default=[])
    parser.add_argument("--output_path", "-o")
    return parser.parse_known_args(list(argv))[0]


def _rename_tasks(argv: Sequence[str], rename: dict[str, str]) -> list[str]:
    """argv with task names in `--tasks`/`-t` values replaced by `rename`."""
    def renamed(value: str) -> str:
        return ",".join(rename.get(name, name) for name in value.split(","))

    out, in_tasks = [], False
    for token in argv:
        if token.startswith("--tasks="):
            token, in_tasks = "--tasks=" + renamed(token.removeprefix("--tasks=")), False
        elif token in ("--tasks", "-t"):
            in_tasks = True
        elif token.startswith("-"):
            in_tasks = False
        elif in_tasks:
            token = renamed(token)
        out.append(token)
    return out


def with_bundled_tasks(argv: Sequence[str]) -> list[str]:
    """The lm-eval command line `argv` with what it needs for the bundled tasks and for
    `vllm_lrs`'s report added (unchanged when neither is used)."""
    argv = list(argv)
    options = _options(argv)
    named = {name for value in options.tasks for name in value.split(",")}
    if named & _BUNDLED_NAMES:
        folder = task_dir()
        if options.include_path is None:
            argv += ["--include_path", str(folder)]
        elif Path(options.include_path).resolve() != folder:
            rename = {name: str(folder / f"{name}.yaml") for name in BUNDLED_TASKS}
            argv = _rename_tasks(argv, {**rename, TAG: str(folder / "*.yaml")})
    if (options.model == LRS_MODEL and options.output_path
            and not any("lrs_report" in value for value in options.model_args)):
        out = Path(options.output_path)
        stamp = datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
        report_dir = out.parent if out.suffix == ".json" else out  # as lm-eval reads it
        argv += ["--model_args", f"lrs_report={report_dir / f'lrs_report_{stamp}.json'}"]
    return argv


def main(argv: Sequence[str] | None = None) -> None:
    """Run lm-eval's command line with the bundled tasks and `vllm_lrs` available."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv == ["--task_dir"]:
        print(task_dir())
        return
    sys.argv = [sys.argv[0], *with_bundled_tasks(argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
