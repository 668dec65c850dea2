"""The plugin inside a COMPILED vLLM CPU engine (the default: no enforce_eager).

vLLM traces the model once and runs the compiled graph afterwards, so Python inside a layer
would only run during the trace. Our intervention lives inside the opaque custom op
`telltale::layer_step`: these tests prove it runs on every step of every later call (counters
keep growing exactly with the decode tokens), acts per request, and matches eager mode.
"""

from __future__ import annotations

import json

import pytest

import telltale_norm
from conftest import PROMPTS, greedy, token_ids, vllm_engine

MAX_TOKENS = 16
LAYERS = "1,2"
TAU0 = json.dumps({"1": 0, "2": 0})
TAU_HUGE = json.dumps({"1": 1e30, "2": 1e30})
ENV = {"VLLM_PATCH": "suppress", "PATCHED_LAYERS": LAYERS, "PATCHED_TAU_JSON": TAU0}


def decode_tokens(prompts, max_tokens):
    return len(prompts) * (max_tokens - 1)  # the first token is sampled by the prefill


def run(llm, prompts=PROMPTS, max_tokens=MAX_TOKENS, **extra):
    telltale_norm.reset_stats(llm)
    tokens = token_ids(llm.generate(prompts, greedy(max_tokens, **extra), use_tqdm=False))
    stats = telltale_norm.stats(llm)
    return tokens, {layer: entry["suppressed"] for layer, entry in stats["per_layer"].items()}


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


@pytest.fixture(scope="module")
def eager_tokens(tiny_model):
    """Tokens of an eager engine with the same settings (started and stopped first)."""
    with vllm_engine(tiny_model("llama"), ENV, enforce_eager=True) as llm:
        yield {"suppress": run(llm)[0], "off": run(llm, telltale_method="off")[0]}


@pytest.fixture(scope="module")
def compiled_llm(tiny_model, eager_tokens):
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


def test_op_runs_on_every_step_of_every_call(compiled_llm):
    expected = decode_tokens(PROMPTS, MAX_TOKENS)
    first, counts1 = run(compiled_llm)
    assert counts1 == {"1": expected, "2": expected}
    second, counts2 = run(compiled_llm)
    assert counts2 == {"1": expected, "2": expected}
    assert second == first
    # A different batch shape and length: the count follows the tokens, it is no constant.
    prompts = PROMPTS[:3]
    _, counts3 = run(compiled_llm, prompts, max_tokens=9)
    assert counts3 == {"1": decode_tokens(prompts, 9), "2": decode_tokens(prompts, 9)}


def test_suppress_changes_output_versus_off_requests(compiled_llm):
    suppressed, counts = run(compiled_llm)
    off, off_counts = run(compiled_llm, telltale_method="off")
    assert counts["1"] > 0 and off_counts == {"1": 0, "2": 0}
    assert all(s != o for s, o in zip(suppressed, off)), "every prompt should change"


def test_huge_tau_equals_off(compiled_llm):
    off, _ = run(compiled_llm, telltale_method="off")
    huge, counts = run(compiled_llm, telltale_tau_json=TAU_HUGE)
    assert huge == off
    assert counts == {"1": 0, "2": 0}


def test_mixed_batch_in_compiled_graph(compiled_llm):
    off, _ = run(compiled_llm, telltale_method="off")
    suppressed, _ = run(compiled_llm)
    params = [greedy(MAX_TOKENS) if i % 2 else greedy(MAX_TOKENS, telltale_method="off")
              for i in range(len(PROMPTS))]
    telltale_norm.reset_stats(compiled_llm)
    mixed = token_ids(compiled_llm.generate(PROMPTS, params, use_tqdm=False))
    assert mixed == [suppressed[i] if i % 2 else off[i] for i in range(len(PROMPTS))]
    half = decode_tokens(PROMPTS[::2], MAX_TOKENS)
    stats = telltale_norm.stats(compiled_llm)["per_layer"]
    assert stats["1"]["suppressed"] == stats["2"]["suppressed"] == half


def test_compiled_equals_eager(compiled_llm, eager_tokens):
    # Float32 tiny model: compiled and eager greedy decoding agree token for token.
    assert run(compiled_llm, telltale_method="off")[0] == eager_tokens["off"]
    assert run(compiled_llm)[0] == eager_tokens["suppress"]

