"""lm-eval end to end, offline: the bundled task generators and YAMLs, the plugin under
`python -m lm_eval` and `python -m telltale_norm.lm_eval`, the statistics file the vLLM worker
writes at exit, and the `vllm_lrs` model type.

Engine tests run real lm-eval in subprocesses, as users do, on a tiny random Llama (fp32,
eager); two at a time, sharing one module fixture. Generated text of a random model is
gibberish, so besides lm-eval's scores they compare the logged samples themselves.
"""

from __future__ import annotations

import json
import operator
import os
import re
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from telltale_norm.config import SETTINGS
from telltale_norm.tasks import BUNDLED_TASKS, DATA_DIR, regenerate_data, task_dir
from telltale_norm.tasks import multiple_choice, word_problems

OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------- generators (no engine)
def test_word_problems_are_deterministic_in_the_seed():
    assert word_problems.generate(60, seed=7) == word_problems.generate(60, seed=7)
    assert word_problems.generate(60, seed=7) != word_problems.generate(60, seed=8)
    assert len({p["question"] for p in word_problems.generate(300, seed=7)}) == 300


def test_word_problem_levels():
    problems = word_problems.generate(600, seed=0)
    assert Counter(p["level"] for p in problems) == {1: 200, 2: 200, 3: 200}
    steps = Counter((p["level"], len(p["steps"])) for p in problems)
    assert set(steps) == {(1, 1), (2, 2), (3, 3), (3, 4)}
    assert len(word_problems.generate(10, seed=0, levels=(2,))) == 10
    assert {p["level"] for p in word_problems.generate(10, seed=0, levels=(2,))} == {2}
    assert len({p["theme"] for p in problems}) >= 8  # apples, money, trains, ...
    with pytest.raises(ValueError, match="levels"):
        word_problems.generate(5, levels=(4,))


def check_word_problem(problem: dict[str, Any]) -> None:
    """Recompute a problem from its structure, independently of the generator's code, and
    check every line of its worked solution."""
    value = problem["start"]
    assert str(value) in problem["question"]
    lines = problem["answer"].splitlines()  # start, one line per step, "The answer is", ####
    for step, line in zip(problem["steps"], lines[1:-2], strict=True):
        result = OPS[step["op"]](value, step["value"])
        assert result == int(result) and result > 0
        a, op, b, c = re.search(r"(\d+) ([-+*/]) (\d+) = (\d+)\.$", line).groups()
        assert (int(a), op, int(b), int(c)) == (value, step["op"], step["value"], result)
        assert str(step["value"]) in problem["question"] or step["op"] == "*"  # "twice"
        value = int(result)
    assert lines[-2:] == [f"The answer is {value}.", f"#### {value}"]
    levels = {1: (1,), 2: (2,), 3: (3, 4)}
    assert len(problem["steps"]) in levels[problem["level"]]


def test_word_problem_answers_are_right():
    problems = word_problems.generate(600, seed=0)
    shipped = [p for name in ("wordproblems_train", "wordproblems_test",
                              "wordproblems_easy_train", "wordproblems_easy_test")
               for p in read_jsonl(DATA_DIR / f"{name}.jsonl")]
    for problem in problems + shipped:
        check_word_problem(problem)
    assert word_problems.solve(problems[0]) == int(problems[0]["answer"].split("#### ")[-1])


def test_word_problem_cli(tmp_path):
    out = tmp_path / "p.jsonl"
    done = subprocess.run([sys.executable, "-m", "telltale_norm.tasks.word_problems", "--n", "30",
                           "--seed", "3", "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr
    assert read_jsonl(out) == word_problems.generate(30, seed=3)


def test_multiple_choice_items():
    items = multiple_choice.generate(300, seed=0)
    assert items == multiple_choice.generate(300, seed=0)
    assert Counter(item["kind"] for item in items) == {kind: 60 for kind in multiple_choice.KINDS}
    for item in items:
        assert len(item["choices"]) == 4 == len(set(item["choices"]))
        if item["kind"] == "largest":
            right = max(item["numbers"])
        elif item["kind"] == "smallest":
            right = min(item["numbers"])
        else:
            right = OPS[item["kind"]](item["a"], item["b"])
        assert item["choices"][item["label"]] == str(right)


def test_shipped_data_is_the_generators_output(tmp_path):
    written = regenerate_data(tmp_path)
    assert sorted(p.name for p in written) == sorted(p.name for p in DATA_DIR.glob("*.jsonl"))
    for path in written:
        assert path.read_bytes() == (DATA_DIR / path.name).read_bytes(), path.name
    sizes = {p.name: len(read_jsonl(p)) for p in written}
    assert sizes["wordproblems_test.jsonl"] >= 500 and sizes["mc_test.jsonl"] >= 200
    assert {p["level"] for p in read_jsonl(DATA_DIR / "wordproblems_easy_test.jsonl")} == {1}


# ---------------------------------------------------------------- task YAMLs (no engine)
def test_task_dir_yamls_load_offline_with_gsm8k_scoring(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    folder = task_dir(tmp_path)
    assert sorted(p.name for p in folder.glob("*.yaml")) == sorted(
        f"{name}.yaml" for name in BUNDLED_TASKS)
    stamp = {p: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert task_dir(tmp_path) == folder and stamp == {p: p.stat().st_mtime_ns
                                                      for p in folder.iterdir()}
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    tasks = manager.load(["telltale"])["tasks"]  # the tag: all bundled tasks
    sizes = {name: len(task.test_docs()) for name, task in tasks.items()}
    assert sizes == {"telltale_wordproblems": 600, "telltale_wordproblems_easy": 120,
                     "telltale_mc": 300}
    easy = tasks["telltale_wordproblems_easy"]
    assert [f["name"] for f in easy.config.filter_list] == ["strict-match", "flexible-extract"]
    assert easy.config.num_fewshot == 5 and len(easy.fewshot_docs()) == 20
    assert easy.doc_to_text(easy.test_docs()[0]).startswith("Question: ")
    assert tasks["telltale_mc"].OUTPUT_TYPE == "multiple_choice"


def test_wrapper_command_line(tmp_path):
    from telltale_norm.lm_eval import with_bundled_tasks

    folder = str(task_dir())
    base = ["--model", "vllm", "--model_args", "pretrained=x", "--limit", "3"]
    assert with_bundled_tasks([*base, "--tasks", "gsm8k"]) == [*base, "--tasks", "gsm8k"]
    assert with_bundled_tasks([*base, "--tasks", "gsm8k,telltale_mc"]) == [
        *base, "--tasks", "gsm8k,telltale_mc", "--include_path", folder]
    # lm-eval takes one include path: with the user's own, our tasks are named by file.
    assert with_bundled_tasks(["--tasks", "telltale_mc", "mine", "--include_path", "/u"]) == [
        "--tasks", f"{folder}/telltale_mc.yaml", "mine", "--include_path", "/u"]
    assert with_bundled_tasks(["--tasks=telltale", "--include_path", "/u"]) == [
        f"--tasks={folder}/*.yaml", "--include_path", "/u"]
    lrs = with_bundled_tasks(["--model", "vllm_lrs", "-t", "gsm8k", "-o", str(tmp_path)])
    assert lrs[-2] == "--model_args"
    assert re.fullmatch(rf"lrs_report={tmp_path}/lrs_report_[-\dT]+\.json", lrs[-1])
    kept = ["--model", "vllm_lrs", "-o", str(tmp_path), "--model_args", "lrs_report=/r.json"]
    assert with_bundled_tasks(kept) == kept


def test_answer_extraction_and_lrs_summary():
    from telltale_norm.lm_eval import extract_answer, lrs_summary

    assert extract_answer("3 + 4 = 7.\n#### 7") == "7"
    assert extract_answer("#### 1,200 and then 5") == "1200"
    assert extract_answer("so it is 12.0 dollars.") == "12"
    assert extract_answer("no number") is None

    def row(answers, chosen, gold="7", task="t"):
        return {"task": task, "gold": gold, "chosen_index": chosen, "metric": "mean",
                "candidates": [{"index": i, "answer": a} for i, a in enumerate(answers)]}

    rows = [row(["7", "8", "8", None], 0),  # selected right, majority wrong
            row(["5", "7", "7", "7"], 0),  # selected wrong, majority right
            row([None, None, "1", "2"], 3),  # nothing right
            row(["7"], 0, gold=None)]  # no gold (not a word problem): not summarised
    summary = lrs_summary(rows)["t"]
    assert summary["requests"] == 3
    assert summary["selected"] == pytest.approx(1 / 3)
    assert summary["random"] == pytest.approx((1 / 4 + 3 / 4 + 0) / 3)
    assert summary["majority"] == pytest.approx(1 / 3)
    assert summary["oracle"] == pytest.approx(2 / 3)
    assert lrs_summary([row(["8", "7"], 1)])["t"]["majority"] == 0  # tie: lowest index


# ---------------------------------------------------------------- lm-eval runs (engine)
LAYERS = "1,2"
K = 3  # vllm_lrs candidates
LIMIT = 4
GEN_TASK, MC_TASK = "telltale_wordproblems_easy", "telltale_mc"


def tau(value: float) -> str:
    return json.dumps({layer: value for layer in LAYERS.split(",")})


# method -> (settings that never intervene, settings that always do, the counter that shows it).
# loop and ttts force with a small tau, not 0: their windows (tau, BLOWUP * tau) and
# "low" (n < GAMMA * tau) are empty at tau = 0.
METHOD_SETTINGS: dict[str, tuple[dict[str, str], dict[str, str], str]] = {
    "suppress": ({"PATCHED_TAU_JSON": tau(1e30)}, {"PATCHED_TAU_JSON": tau(0)}, "suppressed"),
    "loop": ({"PATCHED_TAU_JSON": tau(1e30)},
             {"PATCHED_TAU_JSON": tau(1e-3), "LOOP_BLOWUP": "1e30", "LOOP_GROWTH_EPS": "-1e30"},
             "reruns"),
    "ttts": ({"PATCHED_TAU_JSON": tau(1e30)},
             {"PATCHED_TAU_JSON": tau(1e-3), "TTTS_GAMMA": "1e30", "TTTS_LOW_K": "1",
              "TTTS_P_INJECT": "1", "TTTS_COOLDOWN": "0", "TTTS_COS_MIN": "-1"},
             "injections"),
}
# Each method adds two lm-eval runs (engine starts). rerank runs as `vllm_lrs` below.
METHODS = ["suppress", "loop", "ttts"]


@dataclass
class Run:
    """One lm-eval command line and what it left behind."""

    module: str  # "lm_eval" or "telltale_norm.lm_eval"
    env: dict[str, str]
    tasks: list[str]
    model: str = "vllm"
    model_args: str = ""
    stats_name: str | None = None
    out: Path = Path()
    returncode: int | None = None
    log: str = ""
    results: dict[str, Any] = field(default_factory=dict)
    samples: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)

    @property
    def stats_path(self) -> Path | None:
        return self.out / self.stats_name if self.stats_name else None

    def check(self) -> None:
        assert self.returncode == 0, f"{self.module} failed:\n{self.log[-6000:]}"

    def scores(self, task: str) -> dict[str, Any]:
        return {k: v for k, v in self.results["results"][task].items() if k != "alias"}

    def responses(self, task: str) -> dict[int, Any]:
        return {doc: sample["resps"] for doc, sample in self.samples[task].items()}


def lm_eval_env(extra: dict[str, str]) -> dict[str, str]:
    """This process's environment without telltale settings, offline, plus `extra`."""
    ours = {setting.env for setting in SETTINGS} | {"VLLM_PLUGINS"}
    env = {k: v for k, v in os.environ.items() if k not in ours}
    return {**env, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def run_lm_eval(run: Run, model: Path) -> Run:
    args = [sys.executable, "-m", run.module, "--model", run.model,
            "--model_args", f"pretrained={model},dtype=float32,max_model_len=1024,"
                            f"gpu_memory_utilization=0.1,enforce_eager=True{run.model_args}",
            "--tasks", ",".join(run.tasks), "--batch_size", "auto", "--limit", str(LIMIT),
            "--gen_kwargs", "max_gen_toks=32", "--log_samples", "--output_path", str(run.out)]
    if run.module == "lm_eval":  # the README's command line: the task folder given by hand
        args += ["--include_path", str(task_dir())]
    env = dict(run.env)
    if run.stats_path:
        env["VLLM_PATCH_STATS_PATH"] = str(run.stats_path)
    done = subprocess.run(args, env=lm_eval_env(env), capture_output=True, text=True,
                          timeout=900)
    run.returncode, run.log = done.returncode, done.stdout + done.stderr
    if done.returncode == 0:
        (results,) = run.out.glob("*/results_*.json")
        run.results = json.loads(results.read_text())
        for task in run.tasks:
            (samples,) = run.out.glob(f"*/samples_{task}_*.jsonl")
            run.samples[task] = {s["doc_id"]: s for s in read_jsonl(samples)}
    return run


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory) -> dict[str, Run]:
    """Every lm-eval run of this module, two at a time (each is mostly single-threaded
    start-up). Names: off, noop-<method>, force-<method>, lrs."""
    model = tiny_model("llama")
    plan = {"off": Run("lm_eval", {}, [GEN_TASK, MC_TASK])}
    for method in METHODS:
        noop, force, _ = METHOD_SETTINGS[method]
        patched = {"VLLM_PATCH": method, "PATCHED_LAYERS": LAYERS}
        plan[f"noop-{method}"] = Run("telltale_norm.lm_eval", {**patched, **noop},
                                     [GEN_TASK, MC_TASK], stats_name="stats.json")
        plan[f"force-{method}"] = Run("lm_eval", {**patched, **force,
                                                  "VLLM_PATCH_DUMP_EVERY": "1"},
                                      [GEN_TASK], stats_name="stats.jsonl")
    plan["lrs"] = Run("telltale_norm.lm_eval", {"VLLM_PATCH": "monitor", "PATCHED_LAYERS": LAYERS},
                      [GEN_TASK, MC_TASK], model="vllm_lrs", model_args=f",lrs_k={K}")
    for name, run in plan.items():
        run.out = tmp_path_factory.mktemp(f"lm-eval-{name}")
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(lambda run: run_lm_eval(run, model), plan.values()))
    return plan


@pytest.mark.engine
@pytest.mark.parametrize("method", METHODS)
def test_plugin_that_never_intervenes_scores_exactly_like_plain_vllm(runs, method):
    off, noop = runs["off"], runs[f"noop-{method}"]
    off.check()
    noop.check()
    for task in (GEN_TASK, MC_TASK):
        assert noop.scores(task) == off.scores(task)
        assert len(off.samples[task]) == LIMIT
        assert noop.responses(task) == off.responses(task)  # the generated text, greedy


@pytest.mark.engine
@pytest.mark.parametrize("method", METHODS)
def test_worker_writes_stats_at_exit_of_an_lm_eval_run(runs, method):
    run = runs[f"noop-{method}"]
    run.check()
    stats = json.loads(run.stats_path.read_text())
    counter = METHOD_SETTINGS[method][2]
    assert stats["method"] == method and stats["decode_steps"] > 0
    for layer in LAYERS.split(","):
        assert stats["per_layer"][layer]["tokens"] > 0
        assert stats["per_layer"][layer][counter] == 0


@pytest.mark.engine
@pytest.mark.parametrize("method", METHODS)
def test_forcing_settings_intervene_on_every_patched_layer(runs, method):
    run, off = runs[f"force-{method}"], runs["off"]
    run.check()
    off.check()
    # .jsonl: a line appended after every generate call (VLLM_PATCH_DUMP_EVERY=1; lm-eval
    # sends all requests of a --batch_size auto run in one call) and one at exit.
    lines = read_jsonl(run.stats_path)
    assert len(lines) >= 2
    counter = METHOD_SETTINGS[method][2]
    for line in lines:
        assert line["method"] == method
        for layer in LAYERS.split(","):
            assert line["per_layer"][layer][counter] > 0
    assert run.responses(GEN_TASK) != off.responses(GEN_TASK)


@pytest.mark.engine
def test_lrs_answers_with_the_candidate_its_scores_select(runs):
    run = runs["lrs"]
    run.check()
    (report_path,) = run.out.glob("lrs_report_*.json")
    report = json.loads(report_path.read_text())
    rows = {row["doc_id"]: row for row in report["requests"]}
    assert len(report["requests"]) == len(rows) == LIMIT  # one selection per request
    assert report["lrs_k"] == K
    for doc_id, sample in run.samples[GEN_TASK].items():
        row = rows[doc_id]
        candidates = row["candidates"]
        assert [c["index"] for c in candidates] == list(range(K))
        scores = [c["scores"]["score"] for c in candidates]
        assert row["chosen_index"] == scores.index(max(scores))
        assert all(c["scores"]["metric"] == row["metric"] for c in candidates)
        # lm-eval scored the chosen candidate's text, and only that one.
        assert sample["resps"] == [[candidates[row["chosen_index"]]["text"]]]
        assert row["gold"] == sample["doc"]["answer"].split("#### ")[-1]
    summary = report["summary"][GEN_TASK]
    right = [[c["answer"] == row["gold"] for c in row["candidates"]] for row in rows.values()]
    assert summary["requests"] == LIMIT
    assert summary["random"] == pytest.approx(sum(sum(r) / K for r in right) / LIMIT)
    assert summary["oracle"] == pytest.approx(sum(any(r) for r in right) / LIMIT)
    assert "LRS telltale_wordproblems_easy: 4 requests" in run.log


@pytest.mark.engine
def test_multiple_choice_task_runs_with_the_plugin_on(runs):
    run, off = runs["lrs"], runs["off"]  # vllm_lrs under VLLM_PATCH=monitor: lm-eval's
    run.check()                          # log-likelihoods, the plugin measuring every token
    off.check()
    scores = run.scores(MC_TASK)
    assert 0 <= scores["acc,none"] <= 1 and "acc_norm,none" in scores
    assert scores == off.scores(MC_TASK)
    assert run.responses(MC_TASK) == off.responses(MC_TASK)
    assert all(len(sample["resps"]) == 4 for sample in run.samples[MC_TASK].values())
