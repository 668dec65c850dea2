"""Reasoning spans: which decode steps of a candidate lie inside its thought, or after it.

Reasoning models write `<think> ... </think>` before a short answer, and the paper's signal
concerns the thought. `RERANK_SPAN` (per request `telltale_span`) scores

- `all`: every decode step (the default);
- `reasoning`: the steps whose token lies strictly inside a `<think> ... </think>` pair;
- `answer`: the steps whose token comes after a closing `</think>`, outside any thought.

A decode step measures the hidden state at its input token, so the norms of step `j` belong
to output token `j` (the first output token comes from the prefill; the last one is never
fed back). The delimiters themselves count for neither span. A prompt that ends inside an
open `<think>` (chat templates of DeepSeek-R1, QwQ) starts the output inside the thought; a
prompt whose last delimiter is `</think>` (Qwen3 with thinking off) starts it in the answer.
Tokens before any delimiter belong to neither `reasoning` nor `answer`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

SPANS = ("all", "reasoning", "answer")


def delimiter_ids(tokenizer: Any, start: str, end: str) -> tuple[int, int] | None:
    """The token ids of the two delimiters in `tokenizer`, or None if either is not one
    token of its vocabulary."""
    if tokenizer is None:
        return None
    ids = []
    for name in (start, end):
        token_id = tokenizer.convert_tokens_to_ids(name)
        # Unknown tokens map to the unknown-token id (or None): check the way back.
        if not isinstance(token_id, int) or tokenizer.convert_ids_to_tokens(token_id) != name:
            return None
        ids.append(token_id)
    return ids[0], ids[1]


def missing_delimiters(start: str, end: str, setting: str) -> str:
    """The error for a tokenizer without the delimiters (named by the setting used)."""
    return (f"{setting} needs the reasoning delimiters {start!r} and {end!r} as single tokens "
            "of the model's tokenizer, which has not both; allowed: "
            "RERANK_SPAN=all, or name its delimiter tokens with RERANK_THINK_START / "
            "RERANK_THINK_END at server start")


def span_mask(prompt_ids: Sequence[int], output_ids: Sequence[int], span: str,
              delimiters: tuple[int, int] | None) -> np.ndarray:
    """Per output token (= decode step), whether it counts for `span`."""
    out = np.asarray(output_ids, dtype=np.int64)
    if span == "all":
        return np.ones(len(out), dtype=bool)
    if delimiters is None:
        raise ValueError(f"span {span!r} needs the reasoning delimiters' token ids")
    start, end = delimiters
    # +1 after an opening delimiter, -1 after a closing one, 0 before either; the prompt's
    # last delimiter gives the state the output starts in.
    prompt = np.asarray(prompt_ids, dtype=np.int64)
    marks = np.flatnonzero((prompt == start) | (prompt == end))
    initial = 0 if not len(marks) else (1 if prompt[marks[-1]] == start else -1)
    event = np.where(out == start, 1, np.where(out == end, -1, 0))
    index = np.where(event != 0, np.arange(len(out)), -1)
    last = np.maximum.accumulate(index) if len(out) else index
    state = np.where(last >= 0, event[np.maximum(last, 0)], initial)
    inside = (state == 1) if span == "reasoning" else (state == -1)
    return inside & (event == 0)
