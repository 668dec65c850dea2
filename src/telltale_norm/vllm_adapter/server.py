"""`vllm serve`: LRS annotations in OpenAI responses, and `GET /telltale/stats`.

`/v1/completions` and `/v1/chat/completions`, streamed or not, carry the annotations of
`annotate.py` on every choice whose candidates were scored (`telltale_method=rerank`, the
server's default or `vllm_xargs`; server-side best-of included). The scores arrive with the
outputs themselves (`outputs.py`), from whichever data-parallel engine ran them, so a
response waits for nothing more. Patched: the four response builders of
`OpenAIServingCompletion` and `OpenAIServingChat`; each sees the outputs behind its choices
through a tap on its result generator.

`GET /telltale/stats` (vLLM loads HTTP routes of plugins only when they are named:
`VLLM_PLUGINS=telltale_norm vllm serve ...`) returns the statistics of every worker of every
data-parallel engine, one dict each with its `dp_rank` and `rank`
(`telltale_norm.stats(url, all_ranks=True)`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from telltale_norm import STATS_ROUTE
from telltale_norm.vllm_adapter import internals
from telltale_norm.vllm_adapter.annotate import (add_usage, annotated_stream, annotations,
                                                 choice_fields)
from telltale_norm.vllm_adapter.frontend import engine_config


async def _tapped(results: AsyncIterator[Any], outputs: dict[int, Any], n: int,
                  indexed: bool) -> AsyncIterator[Any]:
    """`results` unchanged, recording each scored final output by its choice index
    (`indexed`: the items are (prompt index, RequestOutput) pairs)."""
    async for item in results:
        prompt, res = item if indexed else (0, item)
        for out in res.outputs:
            if out.finish_reason is not None and hasattr(out, "telltale_scores"):
                outputs[prompt * n + out.index] = out
        yield item


def annotate_response(response: Any, outputs: dict[int, Any], n: int) -> None:
    """Annotate a non-streamed response's choices (in place)."""
    choices = getattr(response, "choices", None)
    result = annotations(outputs, n)
    if result.telltale is None or choices is None:
        return
    for choice in choices:
        for name, value in choice_fields(result.choices.get(choice.index, {})).items():
            setattr(choice, name, value)
    response.telltale = result.telltale
    add_usage(response.usage, result.extra_completion_tokens)


def _completion_response(original):
    def request_output_to_completion_response(self, final_res_batch, request, *args,
                                              **kwargs):
        response = original(self, final_res_batch, request, *args, **kwargs)
        # Choices are numbered in the order of the prompts and of their n outputs.
        outputs = {i: out for i, out in enumerate(
            out for res in final_res_batch for out in res.outputs)
            if hasattr(out, "telltale_scores")}
        if outputs:
            annotate_response(response, outputs, request.n or 1)
        return response

    return request_output_to_completion_response


def _completion_stream(original):
    def completion_stream_generator(self, request, engine_inputs, result_generator, *args,
                                    **kwargs):
        outputs: dict[int, Any] = {}
        n = request.n or 1
        chunks = original(self, request, engine_inputs,
                          _tapped(result_generator, outputs, n, indexed=True), *args, **kwargs)
        return annotated_stream(chunks, outputs, n)

    return completion_stream_generator


def _chat_stream(original):
    def chat_completion_stream_generator(self, request, result_generator, *args, **kwargs):
        outputs: dict[int, Any] = {}
        n = request.n or 1
        chunks = original(self, request, _tapped(result_generator, outputs, n, indexed=False),
                          *args, **kwargs)
        return annotated_stream(chunks, outputs, n)

    return chat_completion_stream_generator


def _chat_full(original):
    async def chat_completion_full_generator(self, request, result_generator, *args,
                                             **kwargs):
        outputs: dict[int, Any] = {}
        n = request.n or 1
        response = await original(self, request,
                                  _tapped(result_generator, outputs, n, indexed=False),
                                  *args, **kwargs)
        if outputs:
            annotate_response(response, outputs, n)
        return response

    return chat_completion_full_generator


# ---------------------------------------------------------------- GET /telltale/stats
async def engine_stats(engine_client: Any) -> list[dict[str, Any]]:
    """Statistics of every worker of every data-parallel engine behind `engine_client`."""
    if not engine_config(engine_client.vllm_config).active:
        return [{"method": "off"}]
    core = engine_client.engine_core
    if not hasattr(core, "call_utility_all_async"):  # the engine runs in this process
        return list(await engine_client.collective_rpc("telltale_stats"))
    internals.require("AsyncMPClient.call_utility_all_async")
    # collective_rpc through the client reaches the first engine only: ask each of them.
    per_engine = await core.call_utility_all_async("collective_rpc", "telltale_stats", None,
                                                   (), None)
    return [stats for workers in per_engine for stats in workers]


class TelltaleEndpoints:
    """vLLM's `vllm.endpoint_plugins` entry point (loaded when `VLLM_PLUGINS` names it)."""

    name = "telltale_norm"
    required_tasks = None

    def attach_router(self, app: Any) -> None:
        from starlette.responses import JSONResponse

        async def stats(request: Any) -> Any:
            return JSONResponse(await engine_stats(request.app.state.telltale_engine_client))

        app.add_route(STATS_ROUTE, stats, methods=["GET"])

    async def init_state(self, engine_client: Any, state: Any, args: Any) -> None:
        state.telltale_engine_client = engine_client


def install() -> None:
    """Patch the response builders in the process that imports them (the API server)."""
    internals.patch("OpenAIServingCompletion.request_output_to_completion_response",
                    _completion_response)
    internals.patch("OpenAIServingCompletion.completion_stream_generator", _completion_stream)
    internals.patch("OpenAIServingChat.chat_completion_stream_generator", _chat_stream)
    internals.patch("OpenAIServingChat.chat_completion_full_generator", _chat_full)
