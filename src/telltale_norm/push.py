"""LRS rows on their way to the caller: worker -> engine core -> frontend, with the outputs.

Each step, the worker hands vLLM's engine core, with its ModelRunnerOutput, a payload per
rerank request (`PushQueue.take`): the norm and tau of that step's decode token on each of
the request's layers, and, with the request's first output, the settings it is scored with.
The engine core attaches the payload to the request's output of the same step, and the
frontend appends it to the request's `Candidate`. When the caller's output is final the
frontend scores the rows of exactly the tokens the caller received (a stop string may end
an output before the engine stops), in the reasoning span the request asked for.

Pure numpy; the vLLM side is `vllm_adapter/engine_core.py` and `vllm_adapter/outputs.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from telltale_norm.config import TelltaleConfig
from telltale_norm.methods.rerank import candidate_scores
from telltale_norm.reasoning import span_mask

KEY = "telltale_norm"  # the payload's key in EngineCoreOutput.kv_transfer_params
ROWS, SCORING = "rows", "scoring"
NORM, TAU = 0, 1  # channels of a pushed row (the recorder's first two)


def scoring_settings(cfg: TelltaleConfig, layers: Sequence[int]) -> dict[str, Any]:
    """What the frontend needs to score a request: its layers and LRS settings."""
    return {"layers": list(layers), "metric": cfg.rerank_metric,
            "layer_agg": cfg.rerank_layer_agg, "late_frac": cfg.rerank_late_frac,
            "span": cfg.rerank_span, "think": [cfg.rerank_think_start, cfg.rerank_think_end]}


@dataclass
class _Pushed:
    req_id: str
    columns: np.ndarray  # the request's layers among the recorder's columns
    scoring: dict[str, Any] | None  # sent with the first output, then None


class PushQueue:
    """The worker's rerank requests, by slot, and what each step sends for them."""

    def __init__(self, recorder_layers: Sequence[int]) -> None:
        self._column = {layer: i for i, layer in enumerate(recorder_layers)}
        self._slots: dict[int, _Pushed] = {}
        self._waiting: dict[int, _Pushed] = {}  # not announced yet (no output so far)

    def add(self, slot: int, req_id: str, cfg: TelltaleConfig, layers: Iterable[int]) -> None:
        """A rerank request admitted to `slot`, acting on `layers` (those this rank runs)."""
        own = [layer for layer in layers if layer in self._column]
        pushed = _Pushed(req_id, np.array([self._column[layer] for layer in own], np.int64),
                         scoring_settings(cfg, own))
        self._slots[slot] = self._waiting[slot] = pushed

    def discard(self, slot: int) -> None:
        self._slots.pop(slot, None)
        self._waiting.pop(slot, None)

    def __len__(self) -> int:
        return len(self._slots)

    def take(self, rows: Iterable[tuple[int, np.ndarray]],
             has_output: Callable[[str], bool]) -> dict[str, dict[str, Any]]:
        """The step's payload by request id: new decode `rows` (slot, [layers, channels])
        of rerank requests, and the settings of those whose first output this step has."""
        out: dict[str, dict[str, Any]] = {}
        for slot, pushed in list(self._waiting.items()):
            if has_output(pushed.req_id):
                out[pushed.req_id] = {SCORING: pushed.scoring}
                del self._waiting[slot]
        chunks: dict[str, list[np.ndarray]] = {}
        for slot, row in rows:
            pushed = self._slots.get(slot)
            if pushed is not None:
                chunks.setdefault(pushed.req_id, []).append(row[pushed.columns, :2])
        for req_id, parts in chunks.items():
            out.setdefault(req_id, {})[ROWS] = np.stack(parts).astype(np.float32).tobytes()
        return out


@dataclass
class Candidate:
    """One candidate's pushed rows in the frontend, scored once its output is final."""

    scoring: dict[str, Any]
    delimiters: tuple[int, int] | None = None
    _chunks: list[bytes] = field(default_factory=list)

    def add(self, rows: bytes) -> None:
        self._chunks.append(rows)

    def rows(self) -> np.ndarray:
        """[decode steps, layers, (norm, tau)]"""
        width = len(self.scoring["layers"])
        if width == 0:  # none of its layers runs on the rank that reports (pipeline parallel)
            return np.zeros((0, 0, 2), np.float32)
        return np.frombuffer(b"".join(self._chunks), np.float32).reshape(-1, width, 2)

    def scores(self, prompt_ids: Sequence[int], output_ids: Sequence[int]) -> dict[str, Any]:
        """LRS scores over the decode steps of the `output_ids` the caller received."""
        data = self.rows()[:max(len(output_ids) - 1, 0)]
        mask = span_mask(prompt_ids, output_ids[:len(data)], self.scoring["span"],
                         self.delimiters)
        s = self.scoring
        scores = candidate_scores(data[mask, :, NORM], data[mask, :, TAU], s["metric"],
                                  s["layer_agg"], s["late_frac"])
        return {**scores, "span": s["span"], "steps": int(mask.sum())}
