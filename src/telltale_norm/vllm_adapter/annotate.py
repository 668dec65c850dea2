"""The LRS annotations of an OpenAI-style response, from the outputs behind its choices.

Every annotated choice gets `telltale_scores` (A, B, C, D, mean, score, metric, span, steps)
and `telltale_selected` (true for the LRS choice of its prompt), and the response a
top-level object

    "telltale": {"method": "rerank", "selected": [LRS choice index per prompt],
                 "choices": [{"index": i, "telltale_scores": {...}, "telltale_selected": b,
                              # server-side best-of only:
                              "best_of": k, "selected_candidate": j,
                              "candidates": [{"index": c, "telltale_scores": {...},
                                              "completion_tokens": t}, ...]}, ...]}

A streamed response carries `telltale_scores` on the last chunk of each choice (the one
with its `finish_reason`), and the top-level object in one more chunk with `"choices": []`
right before the usage chunk (or before `[DONE]`). Plain functions on choice-index ->
CompletionOutput maps and on the SSE strings vLLM yields; no vLLM import.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from telltale_norm.methods.rerank import best_index


@dataclass
class Annotations:
    choices: dict[int, dict[str, Any]] = field(default_factory=dict)  # by choice index
    telltale: dict[str, Any] | None = None  # the top-level object
    extra_completion_tokens: int = 0  # best-of: tokens of the candidates not returned


def annotations(outputs: Mapping[int, Any], n: int) -> Annotations:
    """Annotations of the choices `outputs` (choice index -> final CompletionOutput), where
    choices `p*n .. p*n+n-1` are the candidates of prompt `p`."""
    result = Annotations()
    selected = []
    for prompt in sorted({index // n for index in outputs}):
        group = range(prompt * n, prompt * n + n)
        scores = [getattr(outputs.get(i), "telltale_scores", None) for i in group]
        for i, s in zip(group, scores):
            if s is not None:
                result.choices[i] = {"telltale_scores": s}
        if any(s is None for s in scores):
            continue  # a candidate ran unpatched: no selection for this prompt
        best = best_index([s["score"] for s in scores])
        for j, i in enumerate(group):
            result.choices[i]["telltale_selected"] = j == best
        selected.append(prompt * n + best)
    for i, entry in result.choices.items():
        info = getattr(outputs[i], "telltale_best_of", None)
        if info is not None:
            entry.update(best_of=len(info["candidates"]), selected_candidate=info["selected"],
                         candidates=info["candidates"])
            result.extra_completion_tokens += sum(
                c["completion_tokens"] for c in info["candidates"]) - len(outputs[i].token_ids)
    if result.choices:
        result.telltale = {"method": "rerank", "selected": selected, "choices": [
            {"index": i, **result.choices[i]} for i in sorted(result.choices)]}
    return result


def choice_fields(entry: dict[str, Any]) -> dict[str, Any]:
    """What goes on a response choice itself (the best-of details stay top-level)."""
    return {k: v for k, v in entry.items() if k in ("telltale_scores", "telltale_selected")}


def add_usage(usage: Any, extra: int) -> None:
    """`usage` (an object or a dict) counting `extra` more completion tokens."""
    if not extra or usage is None:
        return
    if isinstance(usage, dict):
        usage["completion_tokens"] += extra
        usage["total_tokens"] += extra
    else:
        usage.completion_tokens += extra
        usage.total_tokens += extra


def _data(chunk: str) -> dict[str, Any] | None:
    if not chunk.startswith("data: {"):
        return None
    return json.loads(chunk[len("data: "):])


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


async def annotated_stream(chunks: AsyncIterator[str], outputs: dict[int, Any],
                           n: int) -> AsyncIterator[str]:
    """vLLM's SSE `chunks` with the annotations of `outputs`, which the caller fills (choice
    index -> scored final CompletionOutput) as the outputs behind the chunks arrive: chunks
    of requests without scores pass untouched and unparsed."""
    head: dict[str, Any] | None = None
    done = False
    try:
        async for chunk in chunks:
            final = chunk.startswith("data: [DONE]")
            usage = '"choices":[]' in chunk and '"usage"' in chunk
            if not done and (final or usage) and outputs:
                result = annotations(outputs, n)
                if result.telltale is not None and head is not None:
                    yield _sse({**head, "choices": [], "telltale": result.telltale})
                if usage:
                    data = _data(chunk)
                    add_usage(data.get("usage"), result.extra_completion_tokens)
                    chunk = _sse(data)
                done = True
            elif outputs and '"finish_reason":"' in chunk:  # a choice's last chunk
                data = _data(chunk)
                if data is not None:
                    head = head or {k: data[k] for k in ("id", "object", "created", "model")
                                    if k in data}
                    chunk = _with_scores(chunk, data, outputs)
            yield chunk
    finally:
        await chunks.aclose()


def _with_scores(chunk: str, data: dict[str, Any], outputs: dict[int, Any]) -> str:
    changed = False
    for choice in data.get("choices") or ():
        out = outputs.get(choice.get("index"))
        scores = getattr(out, "telltale_scores", None)
        if choice.get("finish_reason") is not None and scores is not None:
            choice["telltale_scores"] = scores
            changed = True
    return _sse(data) if changed else chunk
