"""Streaming quartiles against numpy, adaptive tau, calibration-file interpolation."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from telltale_norm.thresholds import (
    StreamingQuantiles,
    adaptive_tau,
    calibration_record,
    interpolate_percentiles,
    load_calibrated_tau,
    read_calibration,
)

REL = 0.004  # one log-bin is about 0.3 % wide

norm_values = st.floats(min_value=1e-3, max_value=1e6, allow_nan=False, allow_infinity=False)


@settings(max_examples=150, deadline=None)
@given(chunks=st.lists(st.lists(norm_values, min_size=1, max_size=40), min_size=1, max_size=8),
       q=st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]))
def test_streamed_quantile_lies_between_the_order_statistics_numpy_interpolates(chunks, q):
    sq = StreamingQuantiles(num_layers=2)
    for chunk in chunks:  # fed step by step, as the engine does
        sq.update(1, torch.tensor(chunk, dtype=torch.float32))
    values = np.sort(np.concatenate([np.float32(c) for c in chunks]).astype(np.float64))
    est = float(sq.quantiles(1, [q])[0])
    rank = q * (len(values) - 1)
    lo, hi = values[int(np.floor(rank))], values[int(np.ceil(rank))]
    assert lo * (1 - REL) <= est <= hi * (1 + REL)
    assert np.isnan(float(sq.quantiles(0, [q])[0]))  # the other layer saw nothing


def test_quartiles_match_numpy_on_a_large_stream():
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(20_000, generator=gen).abs() * 300 + 50
    sq = StreamingQuantiles(num_layers=1)
    for chunk in values.split(37):
        sq.update(0, chunk)
    expect = np.percentile(values.numpy(), [25, 50, 75])
    got = sq.quantiles(0, [0.25, 0.5, 0.75]).numpy()
    np.testing.assert_allclose(got, expect, rtol=REL)
    assert sq.mean(0) == pytest.approx(float(values.double().mean()), rel=1e-9)


def test_weights_mask_values_out():
    sq = StreamingQuantiles(num_layers=1)
    sq.update(0, torch.tensor([1.0, 1000.0, 2.0]), torch.tensor([True, False, True]))
    assert int(sq.total[0]) == 2
    assert float(sq.quantiles(0, [1.0])[0]) == pytest.approx(2.0, rel=REL)


def test_refreshed_quartiles_of_many_layers_equal_each_layers_own_until_the_next_refresh():
    gen = torch.Generator().manual_seed(1)
    sq = StreamingQuantiles(num_layers=5)
    for layer, n in ((1, 300), (3, 1), (4, 57)):  # layer 0 and 2 stay empty
        sq.update(layer, torch.rand(n, generator=gen) * 50 + layer)
    sq.refresh_quartiles(torch.tensor([0, 1, 3, 4]))
    for layer in (1, 3, 4):
        expect = torch.stack(sq.quartiles(layer)).float()
        assert torch.equal(sq.step_quartiles[layer], expect)
    assert sq.step_quartiles[[0, 2]].isnan().all()  # empty, and not refreshed
    before = sq.step_quartiles.clone()
    sq.update(1, torch.full((1000,), 1e4))  # values of the current step: read next step
    torch.testing.assert_close(sq.step_quartiles, before, rtol=0, atol=0, equal_nan=True)
    sq.refresh_quartiles(torch.tensor([1]))
    assert (sq.step_quartiles[1] > 1e3).all() and torch.equal(sq.step_quartiles[3:],
                                                              before[3:])


def test_a_slice_of_layers_refreshes_the_quartiles_an_index_of_them_does():
    gen = torch.Generator().manual_seed(2)
    sq = StreamingQuantiles(num_layers=6)
    for layer in range(6):
        sq.update(layer, torch.rand(40 + layer, generator=gen) * 10 + layer)
    sq.refresh_quartiles(torch.tensor([2, 3, 4]))
    by_index = sq.step_quartiles.clone()
    sq.step_quartiles.fill_(float("nan"))
    sq.refresh_quartiles(slice(2, 5))  # the runtime's default PATCHED_LAYERS: consecutive
    torch.testing.assert_close(sq.step_quartiles, by_index, rtol=0, atol=0, equal_nan=True)
    assert not by_index[2:5].isnan().any() and by_index[[0, 1, 5]].isnan().all()


def test_adaptive_tau_rule():
    q1, q3 = torch.tensor([10.0, 5.0]), torch.tensor([14.0, 5.0])
    tau = adaptive_tau(q1, q3, 1.5, 1e-3, 0.0)
    assert tau.tolist() == pytest.approx([14 + 1.5 * 4, 5 + 1.5 * 1e-3])
    assert adaptive_tau(q1, q3, 1.5, 1e-3, 100.0).tolist() == [100.0, 100.0]


def test_interpolation_is_linear_and_clamped():
    pcts = {50: 10.0, 90: 20.0, 99: 40.0}
    assert interpolate_percentiles(pcts, 0.5) == 10.0
    assert interpolate_percentiles(pcts, 0.7) == pytest.approx(15.0)
    assert interpolate_percentiles(pcts, 0.945) == pytest.approx(30.0)
    assert interpolate_percentiles(pcts, 0.1) == 10.0
    assert interpolate_percentiles(pcts, 0.999) == 40.0


def test_calibration_round_trip(tmp_path):
    sq = StreamingQuantiles(num_layers=4)
    values = torch.linspace(1, 100, 1001)
    sq.update(2, values)
    record = calibration_record(sq, [2, 3])
    assert list(record["per_layer"]) == ["2"]  # layer 3 saw nothing
    entry = record["per_layer"]["2"]
    assert entry["count"] == 1001
    assert entry["p50"] == pytest.approx(50.5, rel=REL)
    path = tmp_path / "stats.json"
    path.write_text(json.dumps(record))
    assert read_calibration(path)[2][95.0] == pytest.approx(95.05, rel=REL)
    assert load_calibrated_tau(path, 0.95)[2] == pytest.approx(95.05, rel=REL)


@pytest.mark.parametrize("content,message", [
    ("[]", "no 'per_layer'"),
    ('{"per_layer": {}}', "no 'per_layer'"),
    ('{"per_layer": {"2": {"mean": 3}}}', "no percentiles"),
    ('{"per_layer": {"x": {"p50": 3}}}', "no percentiles"),
    ("{", "malformed JSON"),
])
def test_malformed_calibration_files_are_rejected(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_calibrated_tau(path, 0.9)
