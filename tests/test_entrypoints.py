"""Entry points in fresh interpreters: the real `vllm.general_plugins` loading, no test harness.

- a plain vLLM script run with the environment variables (and with the PYTHONPATH shim);
- bad settings stop the engine at start, fast, with a message naming variable, value, allowed;
- `vllm serve` with per-request `vllm_xargs`.
"""

from __future__ import annotations

import json
import threading

import pytest

from processes import REPO, clean_env, finish, script_tokens, start_script

pytestmark = pytest.mark.engine  # every test here runs vLLM in a fresh interpreter

MAX_TOKENS = 12
NUM_PROMPTS = 4  # generate.py's prompts
DECODE_TOKENS = NUM_PROMPTS * (MAX_TOKENS - 1)
TAU0 = json.dumps({"1": 0, "2": 0})
TAU_HUGE = json.dumps({"1": 1e30, "2": 1e30})
SUPPRESS_ENV = {"VLLM_PATCH": "suppress", "PATCHED_LAYERS": "1,2", "PATCHED_TAU_JSON": TAU0}
# An engine start takes ~25 s here (more on a busy machine); a bad setting must stop the
# script within a second or two of its `LLM(...)` call, before any engine process starts.
# Counted from that call to the moment the error reaches the script's top level (its exit
# handler), so neither the imports (torch + vllm: ~15-20 s of CPU) nor the interpreter's
# shutdown count. The CPU bound does not depend on the machine's load; the wall-clock one
# is loose, as the other scripts and other work on this 2-core machine can stretch it.
FAST_FAIL_WALL_S = 15.0
FAST_FAIL_CPU_S = 5.0


def after_engine_start(out: str) -> tuple[float, float]:
    """Wall and CPU seconds the script spent from its `LLM(...)` call to its exit."""
    marks = {line.split()[0]: tuple(map(float, line.split()[1:3]))
             for line in out.splitlines() if line.startswith(("ENGINE_START ", "EXIT "))}
    (wall0, cpu0), (wall1, cpu1) = marks["ENGINE_START"], marks["EXIT"]
    return wall1 - wall0, cpu1 - cpu0


# ---------------------------------------------------------------- plain scripts
@pytest.fixture(scope="module")
def script_runs(tiny_model, tmp_path_factory):
    """The script run three ways, concurrently (each is one engine start):
    plain, VLLM_PATCH=suppress with a stats path, and the PYTHONPATH shim with a stats path."""
    model = tiny_model("llama")
    tmp = tmp_path_factory.mktemp("scripts")
    stats = {"env": tmp / "env-stats.json", "shim": tmp / "shim-stats.json"}
    shim_env = {k: v for k, v in SUPPRESS_ENV.items() if k != "VLLM_PATCH"}
    procs = {
        "plain": start_script(model, clean_env(), MAX_TOKENS),
        "env": start_script(model, clean_env(**SUPPRESS_ENV,
                                             VLLM_PATCH_STATS_PATH=str(stats["env"])),
                            MAX_TOKENS),
        "shim": start_script(model, clean_env(
            **shim_env, PYTHONPATH=str(REPO / "vllm_patches" / "suppress"),
            VLLM_PATCH_STATS_PATH=str(stats["shim"])), MAX_TOKENS),
    }
    results = {name: finish(proc) for name, proc in procs.items()}
    return results, stats


def errors_of(out: str, err: str) -> str:
    """The error lines of a failed run (vLLM logs to stdout, tracebacks go to stderr)."""
    lines = [line for line in (out + err).splitlines()
             if "Error" in line or "ERROR" in line or "error" in line]
    return "\n".join(dict.fromkeys(lines[-40:]))


def ok_tokens(results, name):
    rc, out, err = results[name]
    assert rc == 0, f"{name} run failed (rc={rc}):\n{errors_of(out, err)}"
    return script_tokens(out)


def test_script_with_vllm_patch_suppress_changes_output(script_runs):
    results, _ = script_runs
    plain, patched = ok_tokens(results, "plain"), ok_tokens(results, "env")
    assert len(plain) == len(patched) == NUM_PROMPTS
    assert patched != plain


def test_script_writes_stats_file_at_exit(script_runs):
    results, stats = script_runs
    ok_tokens(results, "env")
    path = stats["env"]
    assert path.exists(), (
        f"{path} was not written when the script exited; stderr tail:\n"
        f"{results['env'][2][-3000:]}")
    dumped = json.loads(path.read_text())
    assert dumped["method"] == "suppress"
    assert {layer: dumped["per_layer"][layer]["suppressed"] for layer in ("1", "2")} == {
        "1": DECODE_TOKENS, "2": DECODE_TOKENS}


def test_pythonpath_shim_behaves_like_vllm_patch(script_runs):
    results, stats = script_runs
    shim, patched, plain = (ok_tokens(results, name) for name in ("shim", "env", "plain"))
    assert shim == patched != plain
    dumped = json.loads(stats["shim"].read_text())  # the same exit dump as the env run
    assert dumped["method"] == "suppress"
    assert {layer: dumped["per_layer"][layer]["suppressed"] for layer in ("1", "2")} == {
        "1": DECODE_TOKENS, "2": DECODE_TOKENS}


# ---------------------------------------------------------------- bad settings fail fast
@pytest.fixture(scope="module")
def state_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("state") / "state.json"
    pct = {f"p{p}": float(p) for p in (1, 5, 10, 25, 50, 75, 90, 95, 99)}
    path.write_text(json.dumps({"per_layer": {"1": pct, "2": pct}}))
    return path


BAD_SETTINGS = {
    "method": ({"VLLM_PATCH": "bogus"},
               [r"VLLM_PATCH='bogus'", "allowed: off, monitor, loop, ttts, rerank, suppress"]),
    "layers": ({"VLLM_PATCH": "suppress", "PATCHED_LAYERS": "1,99"},
               ["PATCHED_LAYERS=1,99", "[99]", "allowed: 0..3"]),
    "tau_json": ({"VLLM_PATCH": "suppress", "PATCHED_LAYERS": "1,2",
                  "PATCHED_TAU_JSON": "{bad"},
                 ["PATCHED_TAU_JSON='{bad'", "malformed JSON", "allowed: a JSON object"]),
    "q": ({"VLLM_PATCH": "suppress", "PATCHED_LAYERS": "1,2", "VLLM_PATCH_Q": "2",
           "VLLM_PATCH_STATE_PATH": "<state>"},
          ["VLLM_PATCH_Q='2'", "allowed: a number > 0 and < 1"]),
    "max_extra": ({"VLLM_PATCH": "loop", "PATCHED_LAYERS": "1,2", "LOOP_MAX_EXTRA": "abc"},
                  ["LOOP_MAX_EXTRA='abc'", "allowed: an integer"]),
    # the tiny Llama's tokenizer has no <think> / </think>
    "span": ({"VLLM_PATCH": "rerank", "PATCHED_LAYERS": "1,2", "RERANK_SPAN": "reasoning"},
             ["RERANK_SPAN=reasoning needs the reasoning delimiters '<think>' and '</think>'",
              "allowed: RERANK_SPAN=all"]),
}


@pytest.fixture(scope="module")
def bad_runs(tiny_model, state_file):
    """Every bad setting in its own script, all at once (the imports dominate; the time
    after `LLM(...)` is measured per process)."""
    procs = {}
    for case, (settings, _) in BAD_SETTINGS.items():
        env = {k: str(state_file) if v == "<state>" else v for k, v in settings.items()}
        procs[case] = start_script(tiny_model("llama"), clean_env(**env), MAX_TOKENS)
    return {case: finish(proc, timeout=300) for case, proc in procs.items()}


@pytest.mark.parametrize("case", list(BAD_SETTINGS))
def test_bad_setting_fails_fast_at_engine_start(case, bad_runs):
    rc, out, err = bad_runs[case]
    assert rc != 0
    assert "ENGINE_START" in out  # the imports went fine: the failure is in the engine start
    assert "TOKENS" not in out
    for text in BAD_SETTINGS[case][1]:
        assert text in err, f"{text!r} not in stderr:\n{err[-3000:]}"
    # Failed before any engine process was started (no model loaded, no KV cache).
    assert "(EngineCore" not in out + err and "Loading weights" not in out + err
    wall, cpu = after_engine_start(out)
    print(f"{case}: exit {rc}; after LLM(...): {wall:.1f} s wall, {cpu:.1f} s CPU")
    assert cpu < FAST_FAIL_CPU_S, f"used {cpu:.1f} s CPU after LLM(...) to fail"
    assert wall < FAST_FAIL_WALL_S, f"took {wall:.1f} s after LLM(...) to fail"


# ---------------------------------------------------------------- vllm serve
# The session's `vllm serve` (VLLM_PATCH=monitor on layers 1,2) against an offline engine
# started with the same settings: each method, chosen per request through `vllm_xargs`,
# must give over HTTP exactly what it gives offline.
FORCE_TAU = json.dumps({"1": 1e-3, "2": 1e-3})
METHODS = {
    "off": {"telltale_method": "off"},
    "monitor": {},  # the server's default
    "suppress": {"telltale_method": "suppress", "telltale_tau_json": TAU0},
    "suppress_huge": {"telltale_method": "suppress", "telltale_tau_json": TAU_HUGE},
    "loop": {"telltale_method": "loop", "telltale_tau_json": FORCE_TAU,
             "telltale_blowup": 1e30, "telltale_growth_eps": -1e9, "telltale_max_extra": 2},
    "ttts": {"telltale_method": "ttts", "telltale_tau_json": FORCE_TAU, "telltale_gamma": 1e30,
             "telltale_low_k": 2, "telltale_p_inject": 1, "telltale_cos_min": -1,
             "telltale_cooldown": 1},
    "rerank": {"telltale_method": "rerank", "telltale_tau_json": TAU_HUGE},
}
EDITING = ("suppress", "loop", "ttts")
PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "Write a short poem about the sea:"]
SEED, N = 7, 2  # rerank: two seeded sampled candidates


def rerank_params(max_tokens=MAX_TOKENS):
    from vllm import SamplingParams

    return SamplingParams(n=N, temperature=0.8, seed=SEED, max_tokens=max_tokens,
                          ignore_eos=True, extra_args=METHODS["rerank"])


@pytest.fixture(scope="module")
def offline(tiny_model):
    """What each setting gives offline: greedy tokens per (method, prompt), and the rerank
    candidates with their scores."""
    import telltale_norm.rerank
    from conftest import SERVER_ENV, greedy, token_ids, vllm_engine

    with vllm_engine(tiny_model("llama"), SERVER_ENV) as llm:
        tokens = {}
        for name, xargs in METHODS.items():
            outs = token_ids(llm.generate(PROMPTS, greedy(MAX_TOKENS, **xargs), use_tqdm=False))
            tokens.update({(name, p): t for p, t in zip(PROMPTS, outs)})
        outputs = llm.generate(PROMPTS[:1], rerank_params(), use_tqdm=False)
        (selection,) = telltale_norm.rerank.select(llm, outputs)
    candidates = sorted((c.index, list(c.token_ids)) for c in outputs[0].outputs)
    return tokens, (selection, candidates)


def served_tokens(server, prompt, xargs):
    status, body = server.complete(prompt, xargs or None, max_tokens=MAX_TOKENS)
    assert status == 200, body
    (choice,) = body["choices"]
    return choice["token_ids"]


def test_serve_gives_each_method_what_it_gives_offline(monitor_server, offline):
    tokens, _ = offline
    for name, xargs in METHODS.items():
        for prompt in PROMPTS:
            assert served_tokens(monitor_server, prompt, xargs) == tokens[name, prompt], name
    def all_prompts(name):
        return [tokens[name, prompt] for prompt in PROMPTS]

    # the forcing settings edit; monitor and a huge tau do not
    assert [name for name in EDITING if all_prompts(name) == all_prompts("off")] == []
    assert all(all_prompts(name) == all_prompts("off")
               for name in ("monitor", "suppress_huge", "rerank"))


def test_serve_rerank_returns_the_offline_candidates_scores_and_choice(monitor_server, offline):
    _, (selection, candidates) = offline
    status, body = monitor_server.complete(PROMPTS[0], METHODS["rerank"], max_tokens=MAX_TOKENS,
                                           n=N, temperature=0.8, seed=SEED)
    assert status == 200, body
    choices = sorted(body["choices"], key=lambda c: c["index"])
    assert [(c["index"], c["token_ids"]) for c in choices] == candidates
    for choice in choices:
        want = selection.scores[choice["index"]]
        assert choice["telltale_scores"] == pytest.approx(want), choice["index"]
    assert [c["telltale_selected"] for c in choices] == [
        c["index"] == selection.index for c in choices]


def test_serve_two_concurrent_clients_get_their_own_settings(monitor_server, offline):
    """Two clients, one sending suppress and one loop settings, each a stream of requests at
    the same time: every answer is what its own settings give offline."""
    tokens, _ = offline
    got: dict[tuple[str, int], list[int]] = {}
    errors: list[str] = []
    barrier = threading.Barrier(2)

    def client(name):
        try:
            barrier.wait(timeout=60)
            for i in range(6):
                got[name, i] = served_tokens(monitor_server, PROMPTS[i % 3], METHODS[name])
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(f"{name}: {err!r}")

    threads = [threading.Thread(target=client, args=(name,)) for name in ("suppress", "loop")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    assert got == {(name, i): tokens[name, PROMPTS[i % 3]]
                   for name in ("suppress", "loop") for i in range(6)}


def test_serve_rejects_a_malformed_setting_with_400_and_keeps_serving(monitor_server, offline):
    tokens, _ = offline
    status, body = monitor_server.complete(PROMPTS[0], {"telltale_max_extra": "many"})
    assert 400 <= status < 500, (status, body)
    assert "telltale_max_extra" in json.dumps(body) and "many" in json.dumps(body)
    status, body = monitor_server.complete(PROMPTS[0], {"telltale_nope": 1})
    assert 400 <= status < 500 and "telltale_nope" in json.dumps(body)
    assert served_tokens(monitor_server, PROMPTS[0], METHODS["off"]) == tokens["off", PROMPTS[0]]
    assert "Traceback" not in monitor_server.tail(10**7)
