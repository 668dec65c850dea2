"""rerank (LRS) inside a real vLLM CPU engine (tiny Llama, eager), offline: the scores that
arrive with the outputs equal an independent recomputation from the recorded norms, every
candidate's scores belong to that candidate (checked against a plain-PyTorch decoder), count
exactly the tokens returned, the selection is the argmax of the configured metric, and
`LLM.chat` and server-side best-of (`telltale_best_of`) get the same. Over HTTP:
test_serve_rerank.py."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from vllm import SamplingParams

import telltale_norm
from conftest import PROMPTS, greedy, token_ids, vllm_engine, wait_traces
from reference_decoder import ReferenceDecoder
from rerank_oracles import (LAYERS, RERANK, TAU, TAU_JSON, assert_scores,
                            assert_scores_match_reference, expected_scores, reference_norms)
from telltale_norm import rerank


@pytest.fixture(scope="module")
def llm(tiny_model):
    with vllm_engine(tiny_model("llama"), {"VLLM_PATCH": "monitor", "PATCHED_LAYERS": "1,2"},
                     kv_cache_memory_bytes=128 * 2**20) as engine:
        yield engine


@pytest.fixture(scope="module")
def reference(tiny_model):
    return ReferenceDecoder(tiny_model("llama"))


# ---------------------------------------------------------------- 1: greedy scores
@pytest.mark.parametrize("max_tokens", [24, 21], ids=["23steps", "20steps"])
@pytest.mark.parametrize("settings", [
    {},
    dict(telltale_metric="B", telltale_layer_agg="mean", telltale_late_frac=0.45),
    dict(telltale_metric="D"),
], ids=["default", "B-mean-late45", "D"])
def test_scores_equal_a_recomputation_from_the_monitor_norms(llm, settings, max_tokens):
    monitor = llm.generate(PROMPTS, greedy(max_tokens, telltale_tau_json=TAU_JSON,
                                           telltale_trace=1), use_tqdm=False)
    traces = wait_traces(llm, [(o.request_id, 0) for o in monitor])
    outputs = llm.generate(PROMPTS, greedy(max_tokens, **RERANK, **settings), use_tqdm=False)
    assert token_ids(outputs) == token_ids(monitor)  # neither method changes the output
    selections = rerank.select(llm, outputs)
    for mon, out, sel in zip(monitor, outputs, selections):
        trace = traces[(mon.request_id, 0)]
        assert trace.norm.shape == (max_tokens - 1, len(LAYERS))
        np.testing.assert_array_equal(trace.tau, np.float32([[TAU[1], TAU[2]]] * (max_tokens - 1)))
        want = expected_scores(trace.norm, trace.tau,
                               metric=settings.get("telltale_metric", "mean"),
                               layer_agg=settings.get("telltale_layer_agg", "sum"),
                               late_frac=settings.get("telltale_late_frac", 0.3))
        assert sel.request_id == out.request_id and sel.index == 0
        assert len(sel.scores) == 1
        assert sel.scores[0]["metric"] == settings.get("telltale_metric", "mean")
        assert_scores(sel.scores[0], want)


# ---------------------------------------------------------------- 2: n candidates
N = 4
MAX_TOKENS = (10, 14, 18)  # one per prompt: candidates of different prompts differ in length


def candidates(llm, **extra):
    params = [SamplingParams(n=N, temperature=0.8, seed=40 + i, max_tokens=m, ignore_eos=True,
                             extra_args={**RERANK, **extra})
              for i, m in enumerate(MAX_TOKENS)]
    return llm.generate(PROMPTS[:len(MAX_TOKENS)], params, use_tqdm=False)


@pytest.fixture(scope="module")
def sampled(llm):
    """n = 4 candidates of three concurrent prompts, and their traces (kept on request)."""
    outputs = candidates(llm, telltale_trace=1)
    traces = wait_traces(llm, [(o.request_id, c.index) for o in outputs for c in o.outputs])
    return outputs, traces


def test_each_candidates_trace_and_scores_belong_to_it(sampled, reference):
    outputs, traces = sampled
    for out, max_tokens in zip(outputs, MAX_TOKENS):
        assert sorted(c.index for c in out.outputs) == list(range(N))
        seqs = {tuple(c.token_ids) for c in out.outputs}
        assert len(seqs) == N  # distinct candidates, so a mix-up would show
        for cand in out.outputs:
            trace = traces[(out.request_id, cand.index)]
            assert len(cand.token_ids) == max_tokens
            # one row per decode step: every token but the first (sampled by the prefill)
            assert trace.norm.shape == (len(cand.token_ids) - 1, len(LAYERS))
            want = reference_norms(reference, out.prompt_token_ids, cand.token_ids)
            np.testing.assert_allclose(trace.norm, want, rtol=1e-4, atol=1e-4,
                                       err_msg=f"{out.request_id} candidate {cand.index}")
            assert_scores(trace.scores, expected_scores(trace.norm, trace.tau))
            assert_scores(cand.telltale_scores, trace.scores)  # pushed: the same rows


@pytest.mark.parametrize("settings", [
    dict(telltale_metric="A"),
    dict(telltale_metric="mean"),
    dict(telltale_metric="mean", telltale_layer_agg="mean"),
    dict(telltale_metric="B", telltale_layer_agg="mean"),
], ids=["A", "mean", "mean-layermean", "B-layermean"])
def test_select_picks_the_argmax_of_the_configured_metric(llm, sampled, settings):
    first, traces = sampled
    outputs = candidates(llm, **settings)
    for out, again in zip(first, outputs):  # seeded: the same candidates as the fixture's
        assert [c.token_ids for c in out.outputs] == [c.token_ids for c in again.outputs]
    selections = rerank.select(llm, outputs)
    metric = settings["telltale_metric"]
    agg = settings.get("telltale_layer_agg", "sum")
    for out0, out, sel in zip(first, outputs, selections):
        want = [expected_scores(traces[(out0.request_id, i)].norm,
                                traces[(out0.request_id, i)].tau, metric, agg)
                for i in range(N)]
        for got, exp in zip(sel.scores, want):
            assert_scores(got, exp)
        values = [w["score"] for w in want]
        assert sel.index == int(np.argmax(values))
        assert sel.output.index == sel.index
        assert list(sel.output.token_ids) == list(out.outputs[sel.index].token_ids)
        assert sel.metric == metric
        assert len(set(values)) == N  # no tie: the argmax is unambiguous


def test_ties_go_to_the_lowest_index(llm):
    # With tau huge no token is ever above it: C (and B, D) are 0 for every candidate.
    outputs = candidates(llm, telltale_metric="C",
                         telltale_tau_json=json.dumps({"1": 1e30, "2": 1e30}))
    for sel in rerank.select(llm, outputs):
        assert [s["score"] for s in sel.scores] == [0.0] * N
        assert sel.index == 0


def test_a_finished_trace_survives_the_next_request(llm, reference):
    """The trace (and scores) of a finished candidate stay as they were when a new request
    takes its worker slot before the caller collects them."""
    out = llm.generate(PROMPTS[:1], greedy(16, **RERANK, telltale_trace=1), use_tqdm=False)[0]
    deadline = time.monotonic() + 30
    while telltale_norm.stats(llm)["traces_waiting"] == 0:  # finished and released
        assert time.monotonic() < deadline
        time.sleep(0.05)
    llm.generate(PROMPTS[1:2], greedy(4, telltale_method="off"), use_tqdm=False)
    trace = wait_traces(llm, [(out.request_id, 0)])[(out.request_id, 0)]
    want = reference_norms(reference, out.prompt_token_ids, out.outputs[0].token_ids)
    assert_scores_match_reference(trace.scores, want)  # scored before the slot was reused
    np.testing.assert_allclose(trace.norm, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(trace.tau, np.float32([[TAU[1], TAU[2]]] * 15))




# ---------------------------------------------------------------- 3: what the caller receives
def test_scores_count_exactly_the_tokens_a_stop_string_returns(llm):
    """The engine may run a step past a stop string (the frontend finds it): the scores are
    those of the tokens the caller got."""
    monitor = llm.generate(PROMPTS[:1], greedy(16, telltale_tau_json=TAU_JSON,
                                               telltale_trace=1), use_tqdm=False)[0]
    trace = wait_traces(llm, [(monitor.request_id, 0)])[(monitor.request_id, 0)]
    tokens = list(monitor.outputs[0].token_ids)
    stop = llm.get_tokenizer().decode(tokens[6:8])
    params = greedy(16, **RERANK)
    params.stop = [stop]
    (out,) = llm.generate(PROMPTS[:1], params, use_tqdm=False)
    got = list(out.outputs[0].token_ids)
    assert 3 <= len(got) < 16 and got == tokens[:len(got)]  # the stop string cut it short
    scores = out.outputs[0].telltale_scores
    assert scores["steps"] == len(got) - 1
    assert_scores(scores, expected_scores(trace.norm[:len(got) - 1], trace.tau[:len(got) - 1]))


def best_of_params(k=3, **extra):
    return SamplingParams(temperature=0.8, seed=11, max_tokens=10, ignore_eos=True,
                          extra_args={"telltale_best_of": k, "telltale_tau_json": TAU_JSON,
                                      **extra})


def test_best_of_returns_the_selected_candidate_with_every_candidates_scores(llm):
    full = llm.generate(PROMPTS[:2], SamplingParams(
        n=3, temperature=0.8, seed=11, max_tokens=10, ignore_eos=True, extra_args=RERANK),
        use_tqdm=False)  # the same seeded candidates, all returned
    best = llm.generate(PROMPTS[:2], best_of_params(), use_tqdm=False)
    for everything, one, selection in zip(full, best, rerank.select(llm, best)):
        (only,) = one.outputs
        candidates = sorted(everything.outputs, key=lambda c: c.index)
        info = only.telltale_best_of
        assert info["selected"] == rerank.select(llm, [everything])[0].index == selection.index
        assert only.index == 0 and only.telltale_selected
        assert list(only.token_ids) == list(candidates[info["selected"]].token_ids)
        for cand, entry, scores in zip(candidates, info["candidates"], selection.scores):
            assert entry["index"] == cand.index
            assert entry["completion_tokens"] == len(cand.token_ids) == 10
            assert_scores(entry["telltale_scores"], cand.telltale_scores)
            assert scores is entry["telltale_scores"]
        assert len({c["telltale_scores"]["score"] for c in info["candidates"]}) == 3


def test_a_greedy_best_of_request_samples_its_candidates(llm):
    params = greedy(10, telltale_best_of=3)
    params.seed = 5
    (out,) = llm.generate(PROMPTS[:1], params, use_tqdm=False)
    (only,) = out.outputs
    scores = [c["telltale_scores"]["score"] for c in only.telltale_best_of["candidates"]]
    assert len(set(scores)) == 3  # k greedy candidates would all be the same


@pytest.mark.parametrize("params, match", [
    (SamplingParams(n=2, temperature=0.8, extra_args={"telltale_best_of": 3}), "n=2"),
    (SamplingParams(temperature=0.8, extra_args={"telltale_best_of": 3,
                                                 "telltale_method": "suppress"}), "got suppress"),
    (SamplingParams(extra_args={"telltale_best_of": 0}), "telltale_best_of=0"),
])
def test_bad_best_of_requests_fail_alone(llm, params, match):
    with pytest.raises(ValueError, match=match):
        llm.generate(PROMPTS[:1], params, use_tqdm=False)
    assert token_ids(llm.generate(PROMPTS[:1], greedy(4), use_tqdm=False))  # still serving


def test_chat_candidates_carry_scores_and_one_selection(llm, reference):
    conversation = [{"role": "user", "content": "What is 17 + 25?"}]
    (out,) = llm.chat([conversation], SamplingParams(n=3, temperature=0.8, seed=3,
                                                     max_tokens=8, ignore_eos=True,
                                                     extra_args=RERANK), use_tqdm=False)
    candidates = sorted(out.outputs, key=lambda c: c.index)
    assert [c.telltale_selected for c in candidates].count(True) == 1
    (selection,) = rerank.select(llm, [out])
    assert candidates[selection.index].telltale_selected
    for cand in candidates:
        norm = reference_norms(reference, out.prompt_token_ids, cand.token_ids)
        assert_scores_match_reference(cand.telltale_scores, norm)
