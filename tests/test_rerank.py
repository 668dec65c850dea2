"""rerank (LRS) inside a real vLLM CPU engine and a real `vllm serve` (tiny Llama, eager):
scores equal an independent recomputation from the recorded norms, every candidate's scores
belong to that candidate (checked against a plain-PyTorch decoder), the selection is the
argmax of the configured metric, and the server returns scores and the selection."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch
from vllm import SamplingParams

import telltale_norm
from conftest import PROMPTS, greedy, token_ids, vllm_engine, wait_traces
from reference_decoder import ReferenceDecoder
from telltale_norm import rerank

LAYERS = (1, 2)
# Near the median decode norm of each layer of the tiny model (layer 1: ~6-10, layer 2:
# ~8-12.5): every metric (area, count, late area) sees tokens on both sides of tau.
TAU = {1: 7.6, 2: 10.3}
TAU_JSON = json.dumps({str(k): v for k, v in TAU.items()})
RERANK = dict(telltale_method="rerank", telltale_tau_json=TAU_JSON)
METRICS = ("A", "B", "C", "D", "mean")


@pytest.fixture(scope="module")
def llm(tiny_model):
    with vllm_engine(tiny_model("llama"), {"VLLM_PATCH": "monitor", "PATCHED_LAYERS": "1,2"},
                     kv_cache_memory_bytes=128 * 2**20) as engine:
        yield engine


@pytest.fixture(scope="module")
def reference(tiny_model):
    return ReferenceDecoder(tiny_model("llama"))


# ---------------------------------------------------------------- independent oracles
def expected_scores(norm, tau, metric="mean", layer_agg="sum", late_frac=0.3):
    """SPEC.md "rerank", written out: per layer over the decode steps, then over layers."""
    norm = np.asarray(norm, dtype=np.float64)
    tau = np.asarray(tau, dtype=np.float64)
    steps = norm.shape[0]
    late = math.ceil(late_frac * steps)  # the last 30 % of the steps, rounded up
    per_layer = {
        "A": norm.sum(0),
        "B": np.clip(norm - tau, 0, None).sum(0),
        "C": (norm > tau).sum(0).astype(np.float64),
        "D": np.clip(norm - tau, 0, None)[steps - late:].sum(0),
        "mean": norm.sum(0) / steps,
    }
    agg = np.mean if layer_agg == "mean" else np.sum
    scores = {name: float(agg(v)) for name, v in per_layer.items()}
    scores["score"] = scores[metric]
    return scores


def assert_scores(got, want, rtol=1e-5, atol=1e-4):
    for name in (*METRICS, "score"):
        assert got[name] == pytest.approx(want[name], rel=rtol, abs=atol), (name, got, want)


@torch.no_grad()
def reference_norms(ref, prompt_ids, tokens):
    """Norms after each layer at the positions a candidate's decode steps computed: the
    inputs are its own tokens except the last (the last sampled token is never fed back)."""
    ids = list(prompt_ids) + list(tokens[:-1])
    ref.reset()
    positions = torch.arange(len(ids))
    x = ref.embed[torch.tensor(ids)]
    norms = []
    for i in range(ref.num_layers):
        x = ref.layer(i, x, positions, write_cache=True)
        norms.append(torch.linalg.vector_norm(x, dim=-1))
    return torch.stack(norms, 1)[len(prompt_ids):, list(LAYERS)].numpy()


def assert_scores_match_reference(scores, norm, metric="mean"):
    """Scores of a candidate against those of the reference decoder's norms for its tokens
    (different arithmetic: float tolerance; C only where no norm is within noise of tau)."""
    tau = np.float32([[TAU[1], TAU[2]]] * len(norm))
    want = expected_scores(norm, tau, metric)
    for name in ("A", "B", "D", "mean"):
        assert scores[name] == pytest.approx(want[name], rel=1e-4, abs=1e-3), (name, scores)
    if np.abs(norm - tau).min() > 1e-3:
        assert scores["C"] == want["C"]


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
    """n = 4 candidates of three concurrent prompts, their traces (rerank implies them)."""
    outputs = candidates(llm)
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
    out = llm.generate(PROMPTS[:1], greedy(16, **RERANK), use_tqdm=False)[0]
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


# ---------------------------------------------------------------- 3: over HTTP
def complete(server, prompt, xargs=None):
    status, body = server.complete(prompt, {**RERANK, **(xargs or {})}, max_tokens=12, n=N,
                                   temperature=0.8, seed=7)
    assert status == 200, body
    return body


def check_response(resp, prompts, reference, metric="mean"):
    choices = resp["choices"]
    assert len(choices) == len(prompts) * N
    assert [c["index"] for c in choices] == list(range(len(choices)))
    selected = []
    for i in range(len(prompts)):
        group = choices[i * N:(i + 1) * N]
        assert len({tuple(c["token_ids"]) for c in group}) == N  # a mix-up would show
        for c in group:
            scores = c["telltale_scores"]
            assert set(scores) >= {*METRICS, "score", "metric"}
            assert scores["metric"] == metric and scores["score"] == scores[metric]
            # the scores are this choice's: recomputed from its own tokens
            assert len(c["token_ids"]) == 12
            norm = reference_norms(reference, c["prompt_token_ids"], c["token_ids"])
            assert_scores_match_reference(scores, norm, metric)
        flags = [c["telltale_selected"] for c in group]
        assert flags.count(True) == 1
        best = int(np.argmax([c["telltale_scores"]["score"] for c in group]))
        assert flags.index(True) == best
        selected.append(i * N + best)
    assert resp["telltale"] == {"method": "rerank", "selected": selected}


def test_server_returns_scores_and_the_selection(monitor_server, reference):
    resp = complete(monitor_server, PROMPTS[0])
    check_response(resp, PROMPTS[:1], reference)


def test_server_two_prompts_and_a_per_request_metric(monitor_server, reference):
    resp = complete(monitor_server, PROMPTS[1:3], {"telltale_metric": "A"})
    check_response(resp, PROMPTS[1:3], reference, metric="A")


def test_server_leaves_other_methods_alone(monitor_server):
    resp = complete(monitor_server, PROMPTS[0], {"telltale_method": "monitor"})
    assert len(resp["choices"]) == N and "telltale" not in resp
    assert not any("telltale_scores" in c or "telltale_selected" in c for c in resp["choices"])
