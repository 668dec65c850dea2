"""`vllm serve`: LRS scores and the selected candidate in OpenAI completion responses.

With `telltale_method=rerank` (server default or `vllm_xargs`) and `n=k`, a non-streaming
`/v1/completions` response gets, per choice, `telltale_scores` (A, B, C, D, mean, score,
metric) and `telltale_selected` (true for the LRS choice of its prompt), and at the top
level `telltale: {"method": "rerank", "selected": [choice index per prompt]}`. The scores are
pulled from the worker by RPC once the request is done: a pull needs no change to vLLM's
output path, works for every n, and costs one RPC per HTTP request.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from telltale_norm.config import normalize_method
from telltale_norm.methods.rerank import best_index
from telltale_norm.vllm_adapter.frontend import engine_config
from telltale_norm.vllm_adapter import internals

SCORE_TIMEOUT_S = 30.0


async def _scores(engine_client: Any, ids: list[str], n: int) -> dict[tuple[str, int], dict]:
    """Poll the workers until every candidate of `ids` has its scores (or time runs out)."""
    found: dict[tuple[str, int], dict] = {}
    deadline = time.monotonic() + SCORE_TIMEOUT_S
    while len(found) < len(ids) * n and time.monotonic() < deadline:
        for data in (await engine_client.collective_rpc("telltale_traces", args=(ids,)))[0]:
            if data.get("scores") is not None:
                found[(data["request_id"], data["index"])] = data["scores"]
        if len(found) < len(ids) * n:
            await asyncio.sleep(0.02)
    return found


def _create_completion(original):
    async def create_completion(self, request, raw_request=None):
        response = await original(self, request, raw_request)
        choices = getattr(response, "choices", None)
        xargs = request.vllm_xargs or {}
        engine = engine_config(self.engine_client.vllm_config)
        method = engine.method
        if engine.active and "telltale_method" in xargs:
            method = normalize_method(xargs["telltale_method"])
        if method != "rerank" or not choices or getattr(response, "id", None) is None:
            return response
        n = request.n or 1
        ids = [f"{response.id}-{i}" for i in range(len(choices) // n)]
        found = await _scores(self.engine_client, ids, n)
        selected = []
        for i, request_id in enumerate(ids):
            scores = [found.get((request_id, j)) for j in range(n)]
            if any(s is None for s in scores):
                continue  # scores missing (timed out): leave this prompt unmarked
            best = best_index([s["score"] for s in scores])
            for j, s in enumerate(scores):
                choice = choices[i * n + j]
                choice.telltale_scores = s
                choice.telltale_selected = j == best
            selected.append(i * n + best)
        response.telltale = {"method": "rerank", "selected": selected}
        return response

    return create_completion


def install() -> None:
    """Patch the completion endpoint in the process that imports it (the API server)."""
    internals.patch("OpenAIServingCompletion.create_completion", _create_completion)
