"""LRS scores on small traces, against hand-computed values."""

import numpy as np
import pytest

from telltale_norm.methods.rerank import best_index, candidate_scores, layer_scores


def test_scores_by_hand():
    norm = np.array([[1.0, 10.0], [3.0, 10.0], [5.0, 10.0], [7.0, 10.0]])
    tau = np.array([[2.0, 20.0]] * 4)
    s = layer_scores(norm, tau, late_frac=0.5)
    assert s["A"].tolist() == [16.0, 40.0]
    assert s["B"].tolist() == [1 + 3 + 5, 0.0]
    assert s["C"].tolist() == [3, 0]
    assert s["D"].tolist() == [3 + 5, 0.0]  # last 2 of 4 steps
    assert s["mean"].tolist() == [4.0, 10.0]


def test_late_fraction_rounds_up_and_infinite_tau_counts_nothing():
    norm = np.arange(1.0, 11.0).reshape(10, 1)
    s = layer_scores(norm, np.zeros((10, 1)), late_frac=0.3)
    assert s["D"].tolist() == [8 + 9 + 10]
    s = layer_scores(norm, np.full((10, 1), np.inf), late_frac=0.3)
    assert s["B"].tolist() == [0.0] and s["C"].tolist() == [0]


@pytest.mark.parametrize("agg,expected", [("sum", 2 + 4), ("mean", 3.0)])
def test_aggregation_over_layers(agg, expected):
    scores = candidate_scores(np.array([[2.0, 4.0]]), np.array([[0.0, 0.0]]), "A", agg, 0.3)
    assert scores["score"] == expected and scores["metric"] == "A"


def test_ties_go_to_the_lowest_index():
    assert best_index([1.0, 3.0, 3.0, 2.0]) == 1
    assert best_index([5.0]) == 0


def test_empty_trace_scores_zero():
    s = candidate_scores(np.zeros((0, 2)), np.zeros((0, 2)), "mean", "sum", 0.3)
    assert s["A"] == 0.0 and s["mean"] == 0.0
