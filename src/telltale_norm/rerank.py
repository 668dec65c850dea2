"""Best-of-n selection with LRS for offline `vllm.LLM` (the server uses the same scores).

    params = SamplingParams(n=4, temperature=0.7, extra_args={"telltale_method": "rerank"})
    outputs = llm.generate(prompts, params)
    for choice in telltale_norm.rerank.select(llm, outputs):
        print(choice.output.text, choice.scores[choice.index])

Scores are computed in the worker when each candidate finishes, with the request's own
RERANK_METRIC / RERANK_LAYER_AGG / RERANK_LATE_FRAC, and fetched here by an RPC.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from telltale_norm.methods.rerank import best_index


@dataclass(frozen=True)
class Selection:
    """The LRS choice among one prompt's candidates."""

    request_id: str
    index: int  # the chosen candidate's CompletionOutput.index
    scores: list[dict[str, Any]]  # per candidate, by index: A, B, C, D, mean, score, metric
    output: Any  # the chosen vllm CompletionOutput

    @property
    def metric(self) -> str:
        return str(self.scores[self.index]["metric"])


def select(llm: Any, outputs: Sequence[Any], timeout: float = 30.0) -> list[Selection]:
    """One `Selection` per `RequestOutput` of a `telltale_method="rerank"` generation.

    The worker learns that a request finished one engine step after the caller does, so
    scores are polled until they are all there (or `timeout` seconds pass).
    """
    wanted = {(o.request_id, c.index) for o in outputs for c in o.outputs}
    found: dict[tuple[str, int], dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    ids = sorted({o.request_id for o in outputs})
    while True:
        for data in llm.collective_rpc("telltale_traces", args=(ids,))[0]:
            if data.get("scores") is not None:
                found[(data["request_id"], data["index"])] = data["scores"]
        missing = wanted - found.keys()
        if not missing:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"telltale-norm: no rerank scores for {len(missing)} candidates (e.g. request "
                f"{sorted(missing)[0]}); run them with extra_args telltale_method='rerank' on "
                "an engine started with VLLM_PATCH set (any method)")
        time.sleep(0.02)
    selections = []
    for out in outputs:
        candidates = sorted(out.outputs, key=lambda c: c.index)
        scores = [found[(out.request_id, c.index)] for c in candidates]
        best = best_index([s["score"] for s in scores])
        selections.append(Selection(out.request_id, candidates[best].index, scores,
                                    candidates[best]))
    return selections


def best_of(llm: Any, prompts: Any, params: Any, **generate_kwargs: Any) -> list[Selection]:
    """`llm.generate` with `telltale_method="rerank"` added to `params`, then `select`."""
    params = params.clone()
    params.extra_args = {**(params.extra_args or {}), "telltale_method": "rerank"}
    return select(llm, llm.generate(prompts, params, **generate_kwargs))
