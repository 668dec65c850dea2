"""Frontend: LRS scores on the outputs the caller receives, from rows pushed with them.

The process that holds vLLM's OutputProcessor (the `LLM` process, or the API server) gets
each rerank request's rows with its outputs (`engine_core.py`) and scores a candidate when
its output is final, over exactly the tokens the caller received. Patched:

- `OutputProcessor.__init__`: with `RERANK_SPAN` other than `all`, the tokenizer must have
  the reasoning delimiters, or the engine does not start.
- `OutputProcessor.process_outputs`: takes the payload out of each EngineCoreOutput's
  `kv_transfer_params` before vLLM reads them, into the request's `Candidate`.
- `RequestState._new_completion_output`: a final CompletionOutput gets `telltale_scores`
  (A, B, C, D, mean, score, metric, span, steps); with n = 1 also `telltale_selected`.
- `ParentRequest.get_outputs`: once all n candidates are final (non-streaming),
  `telltale_selected` on each, and for best-of only the selected one (`best_of.py`).

Streamed n > 1 candidates are final one by one; the server selects among them (`server.py`).
A failure here is logged and leaves the output unscored: it never stops vLLM's output loop.
"""

from __future__ import annotations

import logging
from typing import Any

from telltale_norm.config import ConfigError, TelltaleConfig
from telltale_norm.push import KEY, ROWS, SCORING, Candidate
from telltale_norm.reasoning import delimiter_ids, missing_delimiters
from telltale_norm.vllm_adapter import best_of, internals

logger = logging.getLogger("vllm.telltale_norm")
CANDIDATE = "_telltale_candidate"  # the RequestState's attribute


def check_delimiters(config: TelltaleConfig, tokenizer: Any) -> None:
    """Engine start: a RERANK_SPAN other than `all` needs the delimiters as tokens."""
    if config.active and config.rerank_span != "all" and delimiter_ids(
            tokenizer, config.rerank_think_start, config.rerank_think_end) is None:
        raise ConfigError(missing_delimiters(config.rerank_think_start,
                                             config.rerank_think_end,
                                             f"RERANK_SPAN={config.rerank_span}"))


def _init(original):
    def __init__(self, tokenizer, *args, **kwargs):
        original(self, tokenizer, *args, **kwargs)
        # Built right after the engine config, in the process and environment that made it.
        check_delimiters(TelltaleConfig.from_env(), tokenizer)

    return __init__


def _delimiters(processor: Any, scoring: dict[str, Any]) -> tuple[int, int] | None:
    if scoring["span"] == "all":
        return None
    cache = processor.__dict__.setdefault("_telltale_delimiters", {})
    names = tuple(scoring["think"])
    if names not in cache:
        cache[names] = delimiter_ids(processor.tokenizer, *names)
    return cache[names]


def receive(processor: Any, state: Any, payload: dict[str, Any]) -> None:
    """Add one step's payload to the request's candidate (created by its first output)."""
    scoring = payload.get(SCORING)
    if scoring is not None:
        setattr(state, CANDIDATE, Candidate(scoring, _delimiters(processor, scoring)))
    candidate = getattr(state, CANDIDATE, None)
    if candidate is not None and ROWS in payload:
        candidate.add(payload[ROWS])


def _process_outputs(original):
    def process_outputs(self, engine_core_outputs, *args, **kwargs):
        states = self.request_states
        for out in engine_core_outputs:
            params = out.kv_transfer_params
            if not params or KEY not in params:
                continue
            payload = params[KEY]
            out.kv_transfer_params = {k: v for k, v in params.items() if k != KEY} or None
            state = states.get(out.request_id)
            if state is not None:  # None: already aborted, or ended by a stop string
                try:
                    receive(self, state, payload)
                except Exception:  # noqa: BLE001 - never stop vLLM's output loop
                    logger.exception("telltale-norm: bad rerank payload for %s",
                                     out.request_id)
        return original(self, engine_core_outputs, *args, **kwargs)

    return process_outputs


def _new_completion_output(original):
    def new_completion_output(self, token_ids, finish_reason, stop_reason, *args, **kwargs):
        output = original(self, token_ids, finish_reason, stop_reason, *args, **kwargs)
        candidate = getattr(self, CANDIDATE, None)
        if candidate is not None and finish_reason is not None:
            try:
                output.telltale_scores = candidate.scores(
                    self.prompt_token_ids or [], self.detokenizer.output_token_ids)
            except Exception:  # noqa: BLE001 - never stop vLLM's output loop
                logger.exception("telltale-norm: scoring %s failed", self.request_id)
            else:
                if self.parent_req is None:
                    output.telltale_selected = True
        return output

    return new_completion_output


def _get_outputs(original):
    def get_outputs(self, child_request_id, completion_output, *args, **kwargs):
        outputs, finished = original(self, child_request_id, completion_output, *args,
                                     **kwargs)
        if finished and outputs and self.sampling_params.output_kind.name == "FINAL_ONLY":
            outputs = best_of.finish(self.sampling_params, outputs)
        return outputs, finished

    return get_outputs


def install() -> None:
    """Patch vLLM's output path in the processes that import it (LLM, API server)."""
    internals.patch("OutputProcessor.__init__", _init)
    internals.patch("OutputProcessor.process_outputs", _process_outputs)
    internals.patch("RequestState._new_completion_output", _new_completion_output)
    internals.patch("ParentRequest.get_outputs", _get_outputs)
