"""Reasoning spans and pushed-row scoring, without an engine: `reasoning.span_mask` against a
plain loop written from its docstring (`rerank_oracles.span_steps`), `delimiter_ids` on a real tokenizer with
and without the delimiters, and `push.Candidate` against `candidate_scores` on the rows."""

from __future__ import annotations

import numpy as np
import pytest

from telltale_norm.methods.rerank import candidate_scores
from telltale_norm.push import Candidate
from rerank_oracles import span_steps
from telltale_norm.reasoning import delimiter_ids, span_mask

S, E = 900, 901  # delimiter ids in the synthetic sequences


@pytest.mark.parametrize("prompt, output", [
    ([1, 2], [S, 3, 4, E, 5, 6]),
    ([1, S], [3, 4, E, 5]),  # the template opened the thought
    ([S, 7, E], [5, 6, 7]),  # thinking switched off: all answer
    ([1], [3, S, 4, E, 5, S, 6, E, 7]),  # two thoughts, text before the first
    ([1], [3, 4, 5]),  # no delimiters at all
    ([1], [S, 3, 4]),  # a thought never closed
    ([1], []),
])
@pytest.mark.parametrize("span", ["all", "reasoning", "answer"])
def test_span_mask_follows_the_delimiters(prompt, output, span):
    assert span_mask(prompt, output, span, (S, E)).tolist() == span_steps(prompt, output,
                                                                          span, S, E)


def test_a_span_needs_delimiters():
    with pytest.raises(ValueError, match="delimiters"):
        span_mask([1], [2], "reasoning", None)
    assert span_mask([1], [2, 3], "all", None).tolist() == [True, True]


@pytest.fixture(scope="module")
def tokenizers(think_model, tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(think_model), AutoTokenizer.from_pretrained(tiny_model())


def test_delimiter_ids_come_from_the_tokenizer(tokenizers):
    think, plain = tokenizers
    start, end = delimiter_ids(think, "<think>", "</think>")
    assert think.convert_ids_to_tokens([start, end]) == ["<think>", "</think>"]
    assert think("<think>x</think>")["input_ids"].count(start) == 1
    assert delimiter_ids(plain, "<think>", "</think>") is None
    assert delimiter_ids(think, "<think>", "<nope>") is None
    assert delimiter_ids(None, "<think>", "</think>") is None


def test_candidate_scores_the_received_tokens_in_the_span():
    rng = np.random.default_rng(0)
    rows = rng.uniform(1, 10, size=(6, 2, 2)).astype(np.float32)
    scoring = {"layers": [1, 2], "metric": "B", "layer_agg": "sum", "late_frac": 0.3,
               "span": "reasoning", "think": ["<think>", "</think>"]}
    candidate = Candidate(scoring, (S, E))
    for step in rows:  # one pushed row per decode step
        candidate.add(step[None].tobytes())
    np.testing.assert_array_equal(candidate.rows(), rows)
    output = [S, 11, 12, E, 13, 14, 15]  # 7 tokens: 6 decode steps
    got = candidate.scores([1], output)
    mask = np.array([False, True, True, False, False, False])
    want = candidate_scores(rows[mask, :, 0], rows[mask, :, 1], "B", "sum", 0.3)
    assert {k: got[k] for k in want} == pytest.approx(want)
    assert got["steps"] == 2 and got["span"] == "reasoning"
    # a stop string ended the output after 3 tokens: steps of tokens 0 and 1 only
    assert candidate.scores([1], output[:3])["steps"] == 1
