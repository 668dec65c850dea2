"""Independent oracles of the rerank (LRS) tests, written from SPEC.md and reasoning.py's
docstring, not from the plugin's code: the scores of a trace, the norms of a candidate from
the plain-PyTorch reference decoder, and which decode steps a reasoning span covers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

LAYERS = (1, 2)
# Near the median decode norm of each layer of the tiny model (layer 1: ~6-10, layer 2:
# ~8-12.5): every metric (area, count, late area) sees tokens on both sides of tau.
TAU = {1: 7.6, 2: 10.3}
TAU_JSON = json.dumps({str(k): v for k, v in TAU.items()})
RERANK = dict(telltale_method="rerank", telltale_tau_json=TAU_JSON)
METRICS = ("A", "B", "C", "D", "mean")


def expected_scores(norm, tau, metric="mean", layer_agg="sum", late_frac=0.3):
    """SPEC.md "rerank", written out: per layer over the decode steps, then over layers."""
    norm = np.asarray(norm, dtype=np.float64)
    tau = np.asarray(tau, dtype=np.float64)
    steps = norm.shape[0]
    late = math.ceil(late_frac * steps)  # the last 30 % of the steps, rounded up
    per_layer = {
        "A": norm.sum(0),
        "B": np.clip(norm - tau, 0, None).sum(0),
        "C": (norm > tau).sum(0).astype(np.float64),
        "D": np.clip(norm - tau, 0, None)[steps - late:].sum(0),
        "mean": norm.sum(0) / max(steps, 1),
    }
    agg = np.mean if layer_agg == "mean" else np.sum
    scores = {name: float(agg(v)) for name, v in per_layer.items()}
    scores["score"] = scores[metric]
    return scores


def assert_scores(got, want, rtol=1e-5, atol=1e-4):
    for name in (*METRICS, "score"):
        assert got[name] == pytest.approx(want[name], rel=rtol, abs=atol), (name, got, want)


@torch.no_grad()
def reference_norms(ref, prompt_ids, tokens, layers=LAYERS):
    """Norms after each layer at the positions a candidate's decode steps computed: the
    inputs are its own tokens except the last (the last sampled token is never fed back)."""
    ids = list(prompt_ids) + list(tokens[:-1])
    ref.reset()
    positions = torch.arange(len(ids))
    x = ref.embed[torch.tensor(ids)]
    norms = []
    for i in range(ref.num_layers):
        x = ref.layer(i, x, positions, write_cache=True)
        norms.append(torch.linalg.vector_norm(x, dim=-1))
    return torch.stack(norms, 1)[len(prompt_ids):, list(layers)].numpy()


def assert_scores_match_reference(scores, norm, metric="mean", tau=TAU):
    """Scores of a candidate against those of the reference decoder's norms for its tokens
    (different arithmetic: float tolerance; C only where no norm is within noise of tau)."""
    tau = np.float32([[tau[layer] for layer in sorted(tau)]] * len(norm))
    want = expected_scores(norm, tau, metric)
    for name in ("A", "B", "D", "mean"):
        assert scores[name] == pytest.approx(want[name], rel=1e-4, abs=1e-3), (name, scores)
    if np.abs(norm - tau).min(initial=np.inf) > 1e-3:
        assert scores["C"] == want["C"]


def span_steps(prompt, output, span, start, end):
    """Per output token, whether its decode step counts for `span`: inside a thought after
    `start`, in the answer after `end`, delimiters in neither; the prompt's last delimiter
    gives the state the output starts in (a plain loop over the tokens)."""
    state = "none"
    for token in prompt:
        state = {start: "inside", end: "after"}.get(token, state)
    steps = []
    for token in output:
        if token in (start, end):
            state = "inside" if token == start else "after"
            steps.append(span == "all")
        else:
            steps.append(span == "all" or (span, state) in (("reasoning", "inside"),
                                                           ("answer", "after")))
    return steps
