"""The plugin inside a COMPILED vLLM CPU engine (the default: no enforce_eager).

vLLM traces the model once and runs the compiled graph afterwards, so Python inside a layer
runs only during the trace. On an engine where loop is not possible, the plugin's per-layer
step is traced into the graph as ordinary tensor operations: these tests prove it acts on
every step of every later call without any Python running (counters keep growing exactly
with the decode tokens while the step's Python is never called), acts per request, and gives
every method's tokens and counters of the eager engine. Loop's op (Python every step) is
tested compiled on DeepSeek-V2.
"""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest

import telltale_norm
from conftest import PROMPTS, greedy, token_ids, vllm_engine
from telltale_norm.layer import LayerStep
from telltale_norm.methods.loop import LoopLayer

pytestmark = pytest.mark.engine  # its fixtures start engines under other names

MAX_TOKENS = 16
LAYERS = "1,2"
TAU0 = json.dumps({"1": 0, "2": 0})
TAU_HUGE = json.dumps({"1": 1e30, "2": 1e30})
# In-process engine core and worker: the runtime is this process's, so a test sees whether
# its Python runs.
ENV = {"VLLM_PATCH": "monitor", "PATCHED_LAYERS": LAYERS, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
METHODS = {
    "monitor": dict(telltale_method="monitor", telltale_trace=1),
    "suppress": dict(telltale_method="suppress", telltale_tau_json=TAU0),
    "suppress_random": dict(telltale_method="suppress", telltale_suppress_mode="random",
                            telltale_random_suppress_p=0.3, telltale_tau_json=TAU_HUGE),
    "ttts": dict(telltale_method="ttts", telltale_tau_json='{"1": 1e-3, "2": 1e-3}',
                 telltale_gamma=1e30, telltale_low_k=2, telltale_p_inject=0.5,
                 telltale_cos_min=-1.0, telltale_cooldown=2),
    "rerank": dict(telltale_method="rerank", telltale_trace=1,
                   telltale_tau_json='{"1": 5, "2": 5}'),
}
COUNTERS = ("tokens", "suppressed", "injections", "inject_no_match", "max_low_streak")


# ---------------------------------------------------------------- extra tensor arguments
def test_compiled_reruns_get_each_steps_extra_tensors(tmp_path, default_model):
    """DeepSeek-V2 passes `llama_4_scaling`, a tensor computed from the positions inside the
    compiled graph, to every decoder layer. The op takes it as an input, so a re-run gets
    each step's values, not those of the trace (they vary: the tiny model scales from
    position 16 on). Two layers (a dense one, then MLA + MoE) keep the compilation short.
    First in this module, so that no other engine is alive while this one runs."""
    import worker_probes
    from telltale_norm.models import make_tiny_model

    model = make_tiny_model(tmp_path / "deepseek", "deepseek_v2", num_layers=2)
    env = {"VLLM_PATCH": "monitor", "PATCHED_LAYERS": "1", "TELLTALE_ALLOW_LOOP": "1",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # in-process engine core: faster start
    loop = dict(telltale_method="loop", telltale_layers="1", telltale_tau_json='{"1": 1e-3}',
                telltale_blowup=1e12, telltale_growth_eps=-1e9)
    with vllm_engine(model, env, enforce_eager=False) as llm:
        assert not llm.llm_engine.vllm_config.model_config.enforce_eager
        off = token_ids(llm.generate(PROMPTS, greedy(MAX_TOKENS, telltale_method="off"),
                                     use_tqdm=False))
        llm.collective_rpc(worker_probes.record_calls, args=(1,))
        try:
            telltale_norm.reset_stats(llm)
            looped = token_ids(llm.generate(PROMPTS, greedy(MAX_TOKENS, **loop),
                                            use_tqdm=False))
            stats = telltale_norm.stats(llm)
        finally:
            report = llm.collective_rpc(worker_probes.call_report, args=(1,))[0]
        huge = token_ids(llm.generate(PROMPTS, greedy(
            MAX_TOKENS, **{**loop, "telltale_tau_json": '{"1": 1e30}'}), use_tqdm=False))
    assert stats["per_layer"]["1"]["reruns"] == decode_tokens(PROMPTS, MAX_TOKENS)
    assert looped != off and huge == off
    # the first passes ran inside the compiled graph (not logged); each decode step re-ran
    assert report["first_passes"] == 0, report
    assert report["reruns"] == stats["per_layer"]["1"]["rerun_layer_passes"] == (
        stats["decode_steps"]), report
    assert report["extras"] == {"llama_4_scaling": "Tensor"}, report
    assert report["llama_4_error"] < 1e-6 and report["llama_4_values"] > 1, report


def decode_tokens(prompts, max_tokens):
    return len(prompts) * (max_tokens - 1)  # the first token is sampled by the prefill


def run(llm, prompts=PROMPTS, max_tokens=MAX_TOKENS, **extra):
    """Tokens, the counters per layer, and the traces' norms and scores of one generate."""
    telltale_norm.reset_stats(llm)
    outputs = llm.generate(prompts, [greedy(max_tokens, **extra) for _ in prompts],
                           use_tqdm=False)
    llm.generate(["flush"], greedy(1, telltale_method="off"), use_tqdm=False)  # finish notices
    stats = telltale_norm.stats(llm)
    counts = {name: {layer: e[name] for layer, e in stats["per_layer"].items()}
              for name in COUNTERS}
    traces = {t.request_id: (t.norm.tolist(), t.scores) for t in telltale_norm.traces(llm)}
    return token_ids(outputs), counts, [traces.get(o.request_id) for o in outputs]


@contextlib.contextmanager
def python_calls():
    """Counts calls of the per-layer step's Python and of loop's (the op body) while the
    block runs (the engine is in this process). The classes are patched, not the runtime's
    objects: a compiled graph reads its buffers from those objects at every call."""
    calls = {"step": 0, "op": 0}
    originals = {LayerStep: LayerStep.__call__, LoopLayer: LoopLayer.__call__}

    def counting(cls, key):
        def call(self, *args, **kwargs):
            calls[key] += 1
            return originals[cls](self, *args, **kwargs)
        return call

    LayerStep.__call__, LoopLayer.__call__ = counting(LayerStep, "step"), counting(LoopLayer,
                                                                                   "op")
    try:
        yield calls
    finally:
        for cls, original in originals.items():
            cls.__call__ = original


def every_method(llm) -> dict:
    return {name: run(llm, **extra) for name, extra in METHODS.items()}


@pytest.fixture(scope="module")
def eager(tiny_model):
    """Every method on an eager engine with the same settings (started and stopped first),
    and how often the step's Python ran."""
    with vllm_engine(tiny_model("llama"), ENV, enforce_eager=True) as llm:
        with python_calls() as calls:
            results = every_method(llm)
        yield results, calls


@pytest.fixture(scope="module")
def compiled_llm(tiny_model, eager):
    # Default compilation settings: enforce_eager=False (conftest's defaults say True).
    with vllm_engine(tiny_model("llama"), ENV, enforce_eager=False) as llm:
        yield llm


def test_engine_is_really_compiled(compiled_llm):
    from vllm.config import CompilationMode

    config = compiled_llm.llm_engine.vllm_config
    assert not config.model_config.enforce_eager
    # The CPU platform traces once with Dynamo (DYNAMO_TRACE_ONCE); GPUs use VLLM_COMPILE.
    assert config.compilation_config.mode in (CompilationMode.DYNAMO_TRACE_ONCE,
                                              CompilationMode.VLLM_COMPILE)
    assert "telltale_norm" in (config.additional_config or {})  # part of the compile-cache key
    assert "traced into the graph" in telltale_norm.stats(compiled_llm)["start_line"]


def test_every_method_gives_the_eager_engines_tokens_and_counters(compiled_llm, eager):
    eager_results, eager_calls = eager
    with python_calls() as calls:
        compiled = every_method(compiled_llm)
    for name in METHODS:
        tokens, counts, traces = compiled[name]
        want_tokens, want_counts, want_traces = eager_results[name]
        assert tokens == want_tokens, name
        assert counts == want_counts, name
        for got, want in zip(traces, want_traces):
            assert (got is None) == (want is None), name
            if got is not None:
                np.testing.assert_allclose(got[0], want[0], rtol=1e-5, err_msg=name)
                assert (got[1] is None) == (want[1] is None), name
    # and the methods acted: the comparison is not vacuous
    assert sum(compiled["suppress"][1]["suppressed"].values()) == 2 * decode_tokens(
        PROMPTS, MAX_TOKENS)
    assert 0 < sum(compiled["suppress_random"][1]["suppressed"].values())
    assert 0 < sum(compiled["ttts"][1]["injections"].values())
    assert all(t[1]["metric"] == "mean" for t in compiled["rerank"][2])
    # the compiled graph ran every step without the step's Python; the eager engine ran it
    # for each patched layer of each step (the probe works); neither called loop's op
    assert calls == {"step": 0, "op": 0}
    assert eager_calls["step"] > 0 and eager_calls["op"] == 0


def test_the_traced_step_acts_on_every_step_of_every_call(compiled_llm):
    """Counters frozen after the trace, or a step bound to the traced batch, would fail."""
    expected = decode_tokens(PROMPTS, MAX_TOKENS)
    first, counts1, _ = run(compiled_llm, **METHODS["suppress"])
    assert counts1["suppressed"] == {"1": expected, "2": expected} == counts1["tokens"]
    second, counts2, _ = run(compiled_llm, **METHODS["suppress"])
    assert counts2 == counts1 and second == first
    # a different batch shape and length: the count follows the tokens, it is no constant
    prompts = PROMPTS[:3]
    _, counts3, _ = run(compiled_llm, prompts, max_tokens=9, **METHODS["suppress"])
    assert counts3["suppressed"] == {"1": decode_tokens(prompts, 9),
                                     "2": decode_tokens(prompts, 9)}


def test_huge_tau_and_off_requests_equal_plain_output(compiled_llm):
    off, off_counts, _ = run(compiled_llm, telltale_method="off")
    huge, counts, _ = run(compiled_llm, telltale_method="suppress", telltale_tau_json=TAU_HUGE)
    suppressed, _, _ = run(compiled_llm, **METHODS["suppress"])
    assert huge == off and counts["suppressed"] == {"1": 0, "2": 0}
    assert off_counts["tokens"] == {"1": 0, "2": 0}
    assert all(s != o for s, o in zip(suppressed, off)), "every prompt should change"


def test_mixed_batch_in_compiled_graph(compiled_llm):
    off, _, _ = run(compiled_llm, telltale_method="off")
    suppressed, _, _ = run(compiled_llm, **METHODS["suppress"])
    params = [greedy(MAX_TOKENS, **METHODS["suppress"]) if i % 2 else
              greedy(MAX_TOKENS, telltale_method="off") for i in range(len(PROMPTS))]
    telltale_norm.reset_stats(compiled_llm)
    mixed = token_ids(compiled_llm.generate(PROMPTS, params, use_tqdm=False))
    assert mixed == [suppressed[i] if i % 2 else off[i] for i in range(len(PROMPTS))]
    half = decode_tokens(PROMPTS[::2], MAX_TOKENS)
    stats = telltale_norm.stats(compiled_llm)["per_layer"]
    assert stats["1"]["suppressed"] == stats["2"]["suppressed"] == half
