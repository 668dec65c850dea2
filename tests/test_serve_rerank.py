"""LRS over HTTP, against real `vllm serve` processes (tiny Llamas, eager, CPU).

- The session's monitor server, with `telltale_method=rerank` per request (`vllm_xargs`):
  completions and chat completions, streamed or not, carry every choice's scores (checked
  against a plain-PyTorch decoder) and the selection; server-side best-of through the
  `openai` client; a span the tokenizer cannot delimit fails with 400.
- A reasoning server (test_serve_reasoning.py) covers data parallel, the server-wide
  best-of default, lm-eval and reasoning spans.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import PROMPTS
from reference_decoder import ReferenceDecoder
from rerank_oracles import METRICS, RERANK, assert_scores, assert_scores_match_reference
from rerank_oracles import reference_norms

N = 4
MAX_TOKENS = 12
SAMPLED = dict(temperature=0.8, seed=7, max_tokens=MAX_TOKENS)  # and ignore_eos


@pytest.fixture(scope="module")
def reference(tiny_model):
    return ReferenceDecoder(tiny_model("llama"))


@pytest.fixture(scope="module")
def client(monitor_server):
    import openai

    return openai.OpenAI(base_url=monitor_server.url + "/v1", api_key="none", max_retries=0)


def create(client, server, endpoint, xargs, **kwargs):
    """One request through the openai client: a prompt, or one user message for chat."""
    body = {"model": server.model, "extra_body": {"vllm_xargs": xargs, "ignore_eos": True,
                                                  "return_token_ids": True}, **kwargs}
    if endpoint == "chat":
        return client.chat.completions.create(
            messages=[{"role": "user", "content": PROMPTS[3]}], **body)
    return client.completions.create(prompt=PROMPTS[3], **body)


def check_response(resp, n, reference, metric="mean"):
    """Every choice's scores are its own (recomputed from its tokens), one selected per
    prompt, the argmax, and the top-level object says the same."""
    choices = resp["choices"]
    assert [c["index"] for c in choices] == list(range(len(choices)))
    selected = []
    for start in range(0, len(choices), n):
        group = choices[start:start + n]
        assert len({tuple(c["token_ids"]) for c in group}) == n  # a mix-up would show
        for c in group:
            scores = c["telltale_scores"]
            assert set(scores) >= {*METRICS, "score", "metric", "span", "steps"}
            assert scores["metric"] == metric and scores["score"] == scores[metric]
            assert scores["steps"] == len(c["token_ids"]) - 1 == MAX_TOKENS - 1
            prompt = c.get("prompt_token_ids") or resp["prompt_token_ids"]
            norm = reference_norms(reference, prompt, c["token_ids"])
            assert_scores_match_reference(scores, norm, metric)
        flags = [c["telltale_selected"] for c in group]
        best = int(np.argmax([c["telltale_scores"]["score"] for c in group]))
        assert flags == [j == best for j in range(n)]
        selected.append(start + best)
    telltale = resp["telltale"]
    assert telltale["method"] == "rerank" and telltale["selected"] == selected
    assert telltale["choices"] == [
        {"index": c["index"], "telltale_scores": c["telltale_scores"],
         "telltale_selected": c["telltale_selected"]} for c in choices]


def complete(server, prompt, xargs=None):
    status, body = server.complete(prompt, {**RERANK, **(xargs or {})}, n=N, temperature=0.8,
                                   seed=7, max_tokens=MAX_TOKENS)
    assert status == 200, body
    return body


def test_server_returns_scores_and_the_selection(monitor_server, reference):
    check_response(complete(monitor_server, PROMPTS[0]), N, reference)


def test_server_two_prompts_and_a_per_request_metric(monitor_server, reference):
    resp = complete(monitor_server, PROMPTS[1:3], {"telltale_metric": "A"})
    assert len(resp["choices"]) == 2 * N
    check_response(resp, N, reference, metric="A")


def test_server_leaves_other_methods_alone(monitor_server):
    resp = complete(monitor_server, PROMPTS[0], {"telltale_method": "monitor"})
    assert len(resp["choices"]) == N and "telltale" not in resp
    assert not any("telltale_scores" in c or "telltale_selected" in c for c in resp["choices"])


def test_chat_completions_carry_the_same_annotations(client, monitor_server, reference):
    resp = create(client, monitor_server, "chat", RERANK, n=N, **SAMPLED).model_dump()
    check_response(resp, N, reference)


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_a_stream_ends_each_choice_and_itself_with_the_annotations(client, monitor_server,
                                                                   endpoint):
    whole = create(client, monitor_server, endpoint, RERANK, n=N, **SAMPLED).model_dump()
    chunks = [c.model_dump() for c in create(
        client, monitor_server, endpoint, RERANK, n=N, stream=True,
        stream_options={"include_usage": True}, **SAMPLED)]
    last = {}  # choice index -> its chunk with a finish_reason
    for chunk in chunks:
        for choice in chunk["choices"]:
            if choice.get("finish_reason"):
                assert choice["index"] not in last
                last[choice["index"]] = choice
    for choice in whole["choices"]:  # the same seeded candidates: the same numbers
        assert last[choice["index"]]["telltale_scores"] == choice["telltale_scores"]
    *_, final, usage = chunks
    assert final["choices"] == [] and final["telltale"] == whole["telltale"]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_best_of_with_the_openai_client_returns_the_lrs_choice(client, monitor_server,
                                                               endpoint):
    every = create(client, monitor_server, endpoint, RERANK, n=3, **SAMPLED).model_dump()
    xargs = {"telltale_best_of": 3, "telltale_tau_json": RERANK["telltale_tau_json"]}
    best = create(client, monitor_server, endpoint, xargs, **SAMPLED).model_dump()
    (choice,) = best["choices"]
    chosen = every["choices"][every["telltale"]["selected"][0]]
    text = (lambda c: c["message"]["content"]) if endpoint == "chat" else (lambda c: c["text"])
    assert text(choice) == text(chosen) and choice["token_ids"] == chosen["token_ids"]
    assert choice["telltale_selected"] and choice["telltale_scores"] == chosen["telltale_scores"]
    (entry,) = best["telltale"]["choices"]
    assert entry["best_of"] == 3 and entry["selected_candidate"] == chosen["index"]
    for candidate, other in zip(entry["candidates"], every["choices"]):
        assert_scores(candidate["telltale_scores"], other["telltale_scores"])
    assert best["usage"]["completion_tokens"] == every["usage"]["completion_tokens"] == 36
    streamed = [c.model_dump() for c in create(
        client, monitor_server, endpoint, xargs, stream=True,
        stream_options={"include_usage": True}, **SAMPLED)]
    pieces = [text(c["choices"][0]) if endpoint != "chat" else c["choices"][0]["delta"].get(
        "content") or "" for c in streamed if c["choices"]]
    assert "".join(pieces) == text(chosen)
    assert streamed[-1]["usage"]["completion_tokens"] == 36
    assert streamed[-2]["telltale"]["choices"][0]["selected_candidate"] == chosen["index"]


def test_a_span_the_tokenizer_cannot_delimit_fails_with_400(monitor_server):
    status, body = monitor_server.complete(PROMPTS[0], {**RERANK, "telltale_span": "reasoning"})
    assert status == 400, body
    assert "<think>" in json.dumps(body) and "telltale_span=reasoning" in json.dumps(body)
    status, body = monitor_server.complete(PROMPTS[0], {"telltale_best_of": 2}, n=2,
                                           temperature=0.8)
    assert status == 400 and "n=2" in json.dumps(body)
