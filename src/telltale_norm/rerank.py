"""Best-of-n selection with LRS for offline `vllm.LLM` (the server uses the same scores).

    params = SamplingParams(n=4, temperature=0.7, extra_args={"telltale_method": "rerank"})
    outputs = llm.generate(prompts, params)          # or llm.chat(conversations, params)
    for choice in telltale_norm.rerank.select(llm, outputs):
        print(choice.output.text, choice.scores[choice.index])

Each candidate's rows travel with its outputs and are scored when its output is final, over
the tokens it returned, with the request's own RERANK_METRIC / RERANK_LAYER_AGG /
RERANK_LATE_FRAC / RERANK_SPAN: every final `CompletionOutput` carries `telltale_scores`
(and, once all n are final, `telltale_selected`). Nothing is fetched afterwards.

Server-side best-of (`extra_args={"telltale_best_of": k}` with n = 1) returns the selected
candidate alone, with every candidate's scores in `CompletionOutput.telltale_best_of`;
`select` reads those too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from telltale_norm.methods.rerank import best_index


@dataclass(frozen=True)
class Selection:
    """The LRS choice among one prompt's candidates."""

    request_id: str
    index: int  # the chosen candidate's index among the candidates
    scores: list[dict[str, Any]]  # per candidate, by index: A, B, C, D, mean, score, metric
    output: Any  # the chosen vllm CompletionOutput

    @property
    def metric(self) -> str:
        return str(self.scores[self.index]["metric"])


def _missing(request_id: str) -> RuntimeError:
    return RuntimeError(
        f"telltale-norm: no rerank scores on the outputs of request {request_id}; run it with "
        "extra_args telltale_method='rerank' on an engine started with VLLM_PATCH set (any "
        "method), and use the final outputs")


def select(llm: Any, outputs: Sequence[Any]) -> list[Selection]:
    """One `Selection` per `RequestOutput` of a `telltale_method="rerank"` generation.
    (`llm` is unused: the scores came with the outputs; kept for the call's shape.)"""
    selections = []
    for out in outputs:
        candidates = sorted(out.outputs, key=lambda c: c.index)
        best_of = getattr(candidates[0], "telltale_best_of", None) if candidates else None
        if best_of is not None:  # server-side best-of: the selected candidate alone
            scores = [c["telltale_scores"] for c in best_of["candidates"]]
            if any(s is None for s in scores):
                raise _missing(out.request_id)
            selections.append(Selection(out.request_id, best_of["selected"], scores,
                                        candidates[0]))
            continue
        scores = [getattr(c, "telltale_scores", None) for c in candidates]
        if not scores or any(s is None for s in scores):
            raise _missing(out.request_id)
        best = best_index([s["score"] for s in scores])
        selections.append(Selection(out.request_id, candidates[best].index, scores,
                                    candidates[best]))
    return selections


def best_of(llm: Any, prompts: Any, params: Any, **generate_kwargs: Any) -> list[Selection]:
    """`llm.generate` with `telltale_method="rerank"` added to `params`, then `select`."""
    params = params.clone()
    params.extra_args = {**(params.extra_args or {}), "telltale_method": "rerank"}
    return select(llm, llm.generate(prompts, params, **generate_kwargs))
