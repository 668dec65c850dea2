"""Server-side best-of-n with LRS, for any client: one request in, the LRS choice out.

A request with `n = 1` and `telltale_best_of = k` (or the server default `RERANK_BEST_OF=k`
for requests whose method is rerank) runs inside the engine as `n = k` rerank candidates,
and its output is the one selected candidate, with every candidate's scores beside it
(`CompletionOutput.telltale_best_of`). The rules, checked in the frontend before the request
reaches an engine (a bad request fails alone: a ValueError offline, HTTP 400 served):

- `telltale_best_of` in the request makes its method rerank; naming another
  `telltale_method` with it is refused, and so is `n > 1` with it (ask for `n` choices or
  for one best-of choice, not both). The server default leaves `n > 1` requests alone.
- k greedy candidates would all be the same: a greedy request (temperature 0) samples its
  candidates at `RERANK_BEST_OF_TEMPERATURE` (default 0.7).
- the candidates are gathered until all are final (a streamed response carries the
  selected one whole, in one chunk); `usage` counts the tokens of all k (`server.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from telltale_norm.config import REQUEST_KEYS, TelltaleConfig
from telltale_norm.methods.rerank import best_index
from telltale_norm.reasoning import delimiter_ids, missing_delimiters

BEST_OF_KEY = "telltale_best_of"
_GREEDY_EPS = 1e-5  # vLLM's own threshold for greedy sampling


def _refuse(message: str) -> Exception:
    # The frontend's error class: HTTP 400 in the server, a ValueError offline.
    from telltale_norm.vllm_adapter.frontend import RequestSettingsError

    return RequestSettingsError(f"telltale-norm: {message}")


def prepare(params: Any, engine: TelltaleConfig, tokenizer: Any) -> None:
    """Check a request's LRS settings and turn a best-of request into `n = k` candidates
    (in place, on the engine's own copy of the request's SamplingParams)."""
    extra = params.extra_args or {}
    cfg = engine.with_request(extra)
    given = {REQUEST_KEYS[key].field for key in extra if key in REQUEST_KEYS}
    k, n = cfg.rerank_best_of, params.n or 1
    if k > 1 and "rerank_best_of" in given:
        if "method" in given and cfg.method != "rerank":
            raise _refuse(f"{BEST_OF_KEY}={k} selects among rerank candidates; allowed: "
                          f"telltale_method=rerank or none (got {cfg.method})")
        if n > 1:
            raise _refuse(f"{BEST_OF_KEY}={k} with n={n}; allowed: n=1 (one selected "
                          "choice), or no telltale_best_of (n annotated choices)")
        cfg = _expand(params, extra, k, cfg)
    elif k > 1 and cfg.method == "rerank" and n == 1:  # the server's RERANK_BEST_OF
        cfg = _expand(params, extra, k, cfg)
    if cfg.method == "rerank" and cfg.rerank_span != "all" and delimiter_ids(
            tokenizer, cfg.rerank_think_start, cfg.rerank_think_end) is None:
        raise _refuse(missing_delimiters(cfg.rerank_think_start, cfg.rerank_think_end,
                                         f"telltale_span={cfg.rerank_span}"))


def _expand(params: Any, extra: dict[str, Any], k: int, cfg: TelltaleConfig) -> TelltaleConfig:
    params.extra_args = {**extra, "telltale_method": "rerank", BEST_OF_KEY: k}
    params.n = k
    # The candidates are gathered whole: only the final output is needed.
    params.output_kind = type(params.output_kind).FINAL_ONLY
    if params.temperature < _GREEDY_EPS:
        params.temperature = cfg.rerank_best_of_temperature
        params.__dict__.pop("sampling_type", None)  # a cached property of the temperature
    return dataclasses.replace(cfg, method="rerank")


def best_of(params: Any) -> int:
    """k of a request prepared for best-of (1 otherwise)."""
    return int((params.extra_args or {}).get(BEST_OF_KEY, 1))


def finish(params: Any, outputs: list[Any]) -> list[Any]:
    """The final candidates of one prompt, with `telltale_selected` set (ties to the lowest
    index); for a best-of request, the selected candidate alone, as choice 0."""
    scores = [getattr(out, "telltale_scores", None) for out in outputs]
    scored = all(s is not None for s in scores)  # else some candidate ran unpatched
    best = best_index([s["score"] for s in scores]) if scored else 0
    if scored:
        for i, out in enumerate(outputs):
            out.telltale_selected = i == best
    if best_of(params) <= 1:
        return outputs
    chosen = outputs[best]  # the caller asked for one choice: always one
    single = dataclasses.replace(chosen, index=0)
    if scored:
        single.telltale_scores, single.telltale_selected = chosen.telltale_scores, True
    single.telltale_best_of = {
        "selected": chosen.index,
        "candidates": [{"index": out.index, "telltale_scores": s,
                        "completion_tokens": len(out.token_ids)}
                       for out, s in zip(outputs, scores)]}
    return [single]
