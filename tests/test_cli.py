"""The `telltale-norm` command: plot, calibrate (checked against a real engine reading the
file it wrote), the demo end to end, doctor, and one-line errors. Engines run in-process
through `cli.main`, one per engine test, on the default SmolLM2 model."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys

import numpy as np
import pytest

import telltale_norm
from conftest import vllm_engine
from telltale_norm import cli
from telltale_norm.config import SETTINGS
from telltale_norm.demo import DEMO_METHODS
from telltale_norm.plot import figure_size_px
from telltale_norm.traces import ACTION_INJECT, ACTION_RERUN, ACTION_SUPPRESS, RequestTrace


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("telltale-norm: error: "), err
    assert "Traceback" not in err
    return lines[0]


def make_trace(request_id: str, index: int = 0, steps: int = 40) -> RequestTrace:
    rng = np.random.default_rng(index)
    norm = rng.normal(400, 20, (steps, 3)).astype(np.float32)
    tau = np.full((steps, 3), 420, dtype=np.float32)
    tau[:5] = np.inf  # no tau yet (adaptive warm-up): drawn as a gap
    action = np.where(norm > 420, ACTION_SUPPRESS, 0).astype(np.uint8)
    action[7, 1] |= ACTION_RERUN
    action[9, 2] |= ACTION_INJECT
    return RequestTrace(request_id, (21, 22, 23), norm, tau, action, index)


# ---------------------------------------------------------------- plot


def test_plot_writes_png_of_fixed_size_per_layer(tmp_path, capsys):
    traces = tmp_path / "traces.json"
    traces.write_text(json.dumps({"traces": [
        {**make_trace("a").to_dict(), "method": "monitor"},
        {**make_trace("a", steps=30).to_dict(), "method": "suppress"},
        {**make_trace("b").to_dict(), "method": "monitor"},
    ]}))
    out = tmp_path / "a.png"
    assert cli.main(["plot", str(traces), "--out", str(out)]) == 0
    assert png_size(out) == figure_size_px(3) == (1000, 660)
    printed = capsys.readouterr().out
    assert "request a, 2 trace(s)" in printed and "--request" in printed

    # the default name, and a plain list of trace dicts (candidates of one request)
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps([make_trace("r7", i).to_dict() for i in range(3)]))
    assert cli.main(["plot", str(plain), "--request", "r7"]) == 0
    assert png_size(tmp_path / "plain-r7.png") == figure_size_px(3)

    # an image, not a blank canvas: the traces' colours are drawn
    from matplotlib.image import imread

    pixels = imread(tmp_path / "plain-r7.png")[..., :3].reshape(-1, 3)
    assert len(np.unique((pixels * 255).astype(np.uint8), axis=0)) > 50

    capsys.readouterr()
    assert cli.main(["plot", str(traces), "--request", "zzz"]) == 2
    assert "holds a, b" in one_error_line(capsys.readouterr().err)


def test_user_mistakes_give_one_line_and_exit_2(tmp_path, capsys):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    no_prompt = tmp_path / "p.jsonl"
    no_prompt.write_text('{"text": "hi"}\n')
    cases = [
        (["plot", str(tmp_path / "missing.json")], "cannot read it"),
        (["plot", str(bad_json)], "not JSON"),
        (["calibrate", "--prompts", str(no_prompt)], "line 1: needs a \"prompt\""),
        (["calibrate", "--q", "1.5"], "--q: expected a number between 0 and 1"),
        (["calibrate", "--layers", "a,b"], "--layers"),
        (["demo", "--methods", "off,bogus"], "unknown method 'bogus'"),
        (["demo", "--n-problems", "0"], "positive integer"),
        (["nosuchcommand"], "invalid choice"),
    ]
    for argv, expected in cases:
        assert cli.main(argv) == 2, argv
        assert expected in one_error_line(capsys.readouterr().err), argv


def test_missing_prompts_file_from_the_shell():
    # The real entry point: exit status and stderr of a separate process.
    run = subprocess.run([sys.executable, "-m", "telltale_norm", "calibrate", "--prompts",
                          "/nonexistent"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "--prompts /nonexistent: cannot read it" in one_error_line(run.stderr)
    assert run.stdout == ""


# ---------------------------------------------------------------- doctor


def test_doctor_passes_here_and_reports_a_bad_setting(capsys, monkeypatch):
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "[FAIL]" not in out and "all checks passed" in out
    for what in ("vLLM 0.32", "platform: cpu", "plugin entry point telltale_norm",
                 "transformers", "telltale settings", "gpu_memory_utilization="):
        assert re.search(rf"^\[ OK \] .*{re.escape(what)}", out, re.M), what

    monkeypatch.setenv("VLLM_PATCH", "bogus")
    assert cli.main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^\[FAIL\] telltale settings .*VLLM_PATCH='bogus'", out, re.M)
    assert "fix: fix or unset that variable" in out and "1 check(s) failed" in out


def test_doctor_checks_a_model(tmp_path, capsys, monkeypatch):
    def doctor(arch: str) -> tuple[int, str]:
        model = tmp_path / arch
        model.mkdir()
        (model / "config.json").write_text(json.dumps(
            {"architectures": [arch], "num_hidden_layers": 24}))
        code = cli.main(["doctor", "--model", str(model)])
        return code, capsys.readouterr().out

    code, out = doctor("Qwen2ForCausalLM")
    assert code == 0 and "Qwen2ForCausalLM, 24 layers; its decoder layers fit" in out
    assert "patched layers on this model: [18, 19, 20, 21, 22]" in out
    code, out = doctor("FalconForCausalLM")
    assert code == 1 and re.search(r"^\[FAIL\] .*FalconForCausalLM", out, re.M)
    monkeypatch.setenv("PATCHED_LAYERS", "30")
    code, out = doctor("LlamaForCausalLM")
    assert code == 1 and re.search(r"^\[FAIL\] PATCHED_LAYERS=30: .*outside the model", out,
                                   re.M)


@pytest.mark.engine
def test_doctor_engine_checks_the_plugin_in_the_default_compiled_engine(tiny_model):
    """What a GPU user runs, here on the CPU backend: a fresh interpreter, the real plugin
    entry point, the default compiled engine."""
    from processes import clean_env

    run = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "telltale-norm"), "doctor", "--engine",
         str(tiny_model("llama")), "--dtype", "float32", "--max-tokens", "12",
         "--min-ratio", "0"],
        env=clean_env(PATCHED_LAYERS="1,2"), capture_output=True, text=True, timeout=1500)
    out = run.stdout
    assert run.returncode == 0, out[-3000:] + run.stderr[-3000:]
    for what in ("plugin start line: telltale-norm: VLLM_PATCH=monitor wrapped 2 decoder "
                 "layers of LlamaForCausalLM", "plugin start line: telltale-norm: VLLM_PATCH="
                 "loop wrapped 2", "CUDA graphs: NONE (plain engine: NONE), compilation mode "
                 "DYNAMO_TRACE_ONCE: the plugin's step is in the graph", "with loop: CUDA "
                 "graphs NONE", "monitor: 44 decode tokens counted on each of layers "
                 "[1, 2] (counted [44]), output unchanged", "suppress: tau 0 changes the output",
                 "loop: forced re-runs happen", "decode throughput with the plugin"):
        assert re.search(rf"^\[PASS\] {re.escape(what)}", out, re.M), what
    assert "all checks passed" in out


# ---------------------------------------------------------------- engines


@pytest.mark.engine
def test_calibrate_prints_the_tau_an_engine_reads_from_its_file(default_model, tmp_path,
                                                                capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(item) for item in [
        {"question": "Ann has 5 apples and buys 7 more. How many apples does she have?"},
        {"prompt": "The capital of France is"},
        {"question": "A box holds 6 eggs. How many eggs are in 4 boxes?"},
    ]) + "\n")
    stats = tmp_path / "stats.json"
    names = [s.env for s in SETTINGS] + ["VLLM_LOGGING_LEVEL"]
    before = {name: os.environ.get(name) for name in names}
    assert cli.main(["calibrate", "--model", str(default_model), "--prompts", str(prompts),
                     "--max-tokens", "16", "--layers", "23,24", "--q", "0.9",
                     "--out", str(stats)]) == 0
    # the engine's settings do not leak into the caller's environment
    assert {name: os.environ.get(name) for name in names} == before
    out = capsys.readouterr().out
    layers = re.search(r"^PATCHED_LAYERS=(\S+)$", out, re.M).group(1)
    printed = json.loads(re.search(r"^PATCHED_TAU_JSON='(.*)'$", out, re.M).group(1))
    assert layers == "23,24" and set(printed) == {"23", "24"}
    record = json.loads(stats.read_text())["per_layer"]
    assert set(record) == {"23", "24"}
    for layer, entry in record.items():
        assert 0 < entry["count"] <= 3 * 15  # decode tokens (the first comes from prefill)
        assert entry["p1"] < entry["p50"] < entry["p99"]
        assert printed[layer] == pytest.approx(entry["p90"], abs=1e-3)  # q=0.9: a listed point

    env = {"VLLM_PATCH": "suppress", "PATCHED_LAYERS": layers,
           "VLLM_PATCH_STATE_PATH": str(stats), "VLLM_PATCH_Q": "0.9"}
    with vllm_engine(default_model, env, dtype="bfloat16", max_model_len=1024) as llm:
        per_layer = telltale_norm.stats(llm)["per_layer"]
    for layer, tau in printed.items():
        assert per_layer[layer]["tau"] == pytest.approx(tau, abs=1e-3)


@pytest.mark.engine
def test_demo_quick_runs_every_method_and_writes_its_files(default_model, tmp_path, capsys):
    out_dir = tmp_path / "demo"
    # --quick, shrunk further for CI: one engine start dominates the time
    assert cli.main(["demo", "--quick", "--n-problems", "3", "--max-tokens", "24",
                     "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert "telltale_tau_json" in out and "q0.9 of the baseline (monitor) run" in out
    table = {line.split()[0]: line.split() for line in out.splitlines()
             if line.split() and line.split()[0] in DEMO_METHODS}
    assert tuple(table) == DEMO_METHODS
    for method, cells in table.items():
        expected = ("ok",) if method in ("off", "monitor", "suppress") else ("ok", "unavailable")
        assert cells[1] in expected, cells

    results = json.loads((out_dir / "results.json").read_text())
    rows = {row["method"]: row for row in results["methods"]}
    assert tuple(rows) == DEMO_METHODS and results["patched_layers"] == list(range(23, 29))
    # monitor only observes; suppress at the p90 tau of the monitor run does act. (Answers
    # of off and monitor are not compared: bf16 on CPU depends on how requests batch.)
    assert rows["off"]["interventions"] == rows["monitor"]["interventions"] == 0
    assert rows["suppress"]["interventions"] > 0
    for row in rows.values():
        if row["status"] == "ok":
            assert row["total"] == 3 and row["ci"][0] <= row["correct"] / 3 <= row["ci"][1]

    assert png_size(out_dir / "norm_trace.png") == figure_size_px(6)
    traces = json.loads((out_dir / "traces.json").read_text())["traces"]
    traced = {(t["request_id"], t["method"]) for t in traces}
    assert traced >= {(f"problem-{i}", m) for i in range(3) for m in ("monitor", "suppress")}
    assert not any(method == "off" for _, method in traced)  # off is plain vLLM: no trace
    # the traces mark exactly the suppressions the statistics counted
    marked = sum(bit & 1 for t in traces if t["method"] == "suppress"
                 for row in t["action"] for bit in row)
    assert marked == rows["suppress"]["interventions"]
    # the demo's traces feed `plot`
    png = tmp_path / "p1.png"
    assert cli.main(["plot", str(out_dir / "traces.json"), "--request", "problem-1",
                     "--out", str(png)]) == 0
    assert png_size(png) == figure_size_px(6)
