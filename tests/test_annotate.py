"""The annotations of OpenAI responses (`vllm_adapter/annotate.py`), without an engine: the
selection per prompt, best-of details and usage, and the SSE rewriting of a stream."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

from telltale_norm.vllm_adapter.annotate import annotated_stream, annotations


def out(score, tokens=3, best_of=None):
    o = SimpleNamespace(telltale_scores={"score": score, "metric": "mean"},
                        token_ids=[0] * tokens)
    if best_of is not None:
        o.telltale_best_of = best_of
    return o


def test_selection_per_prompt_and_unscored_prompts():
    # two prompts of n = 3; prompt 1 lost a candidate's scores (ran unpatched)
    outputs = {0: out(1.0), 1: out(3.0), 2: out(3.0), 3: out(5.0), 5: out(1.0)}
    result = annotations(outputs, n=3)
    assert [result.choices[i].get("telltale_selected") for i in (0, 1, 2)] == [
        False, True, False]  # ties go to the lowest index
    assert "telltale_selected" not in result.choices[3]
    assert result.telltale["selected"] == [1]
    assert [c["index"] for c in result.telltale["choices"]] == [0, 1, 2, 3, 5]
    assert result.extra_completion_tokens == 0
    assert annotations({}, n=2).telltale is None


def test_best_of_lists_every_candidate_and_counts_their_tokens():
    info = {"selected": 2, "candidates": [
        {"index": i, "telltale_scores": {"score": s}, "completion_tokens": t}
        for i, (s, t) in enumerate([(1.0, 4), (2.0, 6), (3.0, 5)])]}
    result = annotations({0: out(3.0, tokens=5, best_of=info)}, n=1)
    (entry,) = result.telltale["choices"]
    assert entry["best_of"] == 3 and entry["selected_candidate"] == 2
    assert entry["candidates"] == info["candidates"] and entry["telltale_selected"]
    assert result.extra_completion_tokens == 4 + 6


def sse(data):
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


def test_stream_gets_scores_on_each_last_chunk_and_one_final_chunk():
    head = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m"}
    chunks = [
        sse({**head, "choices": [{"index": 0, "text": "a", "finish_reason": None}]}),
        sse({**head, "choices": [{"index": 1, "text": "b", "finish_reason": "length"}]}),
        sse({**head, "choices": [{"index": 0, "text": "c", "finish_reason": "stop"}]}),
        sse({**head, "choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 6,
                                              "total_tokens": 8}}),
        "data: [DONE]\n\n"]
    outputs = {}
    arrivals = {1: {1: out(2.0)}, 2: {0: out(1.0)}}  # what the tap sees before each chunk

    async def source():
        for i, chunk in enumerate(chunks):
            outputs.update(arrivals.get(i, {}))
            yield chunk

    async def collect():
        return [c async for c in annotated_stream(source(), outputs, n=2)]

    got = asyncio.run(collect())
    assert got[0] == chunks[0]  # not a last chunk: passed unparsed
    data = [json.loads(c[len("data: "):]) for c in got[:-1]]
    assert data[1]["choices"][0]["telltale_scores"]["score"] == 2.0
    assert data[2]["choices"][0]["telltale_scores"]["score"] == 1.0
    final = data[3]
    assert final["choices"] == [] and {k: final[k] for k in head} == head
    assert final["telltale"]["selected"] == [1]
    assert [c["telltale_selected"] for c in final["telltale"]["choices"]] == [False, True]
    assert data[4]["usage"]["completion_tokens"] == 6  # no best-of: unchanged
    assert got[-1] == "data: [DONE]\n\n" and len(got) == len(chunks) + 1


def test_a_stream_without_scores_passes_untouched():
    chunks = [sse({"id": "x", "choices": [{"index": 0, "finish_reason": "stop"}]}),
              "data: [DONE]\n\n"]

    async def source():
        for chunk in chunks:
            yield chunk

    async def collect():
        return [c async for c in annotated_stream(source(), {}, n=1)]

    assert asyncio.run(collect()) == chunks
