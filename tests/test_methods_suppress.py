"""suppress on small tensors: which tokens, by how much, written back exactly."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from telltale_norm import rng
from telltale_norm.config import TelltaleConfig
from telltale_norm.methods.suppress import suppress_factors
from telltale_norm.norms import residual_stream, scale_residual_stream, token_norms
from telltale_norm.requests import request_row


def _args(norms, tau, **kw):
    n = len(norms)
    full = lambda v, dtype=torch.float32: torch.full((n,), v, dtype=dtype)  # noqa: E731
    args = dict(norms=torch.tensor(norms), tau=full(tau), eligible=full(True, torch.bool),
                random_mode=full(False, torch.bool), draws=full(0.5), p=full(0.0),
                clamp_action=full(False, torch.bool), mul_scale=full(0.1), clamp_div=full(4.0))
    args.update(kw)
    return args


def test_high_norm_mul_scales_only_tokens_above_tau():
    factor, chosen = suppress_factors(**_args([1.0, 5.0, 10.0], 4.0))
    assert chosen.tolist() == [False, True, True]
    assert factor.tolist() == [1.0, torch.tensor(0.1).item(), torch.tensor(0.1).item()]


def test_clamp_rescales_to_tau_over_div_and_never_enlarges():
    clamp = torch.ones(3, dtype=torch.bool)
    n = torch.tensor([1.0, 5.0, 10.0])
    factor, chosen = suppress_factors(**_args(n.tolist(), 8.0, clamp_action=clamp))
    assert chosen.tolist() == [False, False, True]
    assert (n * factor).tolist() == [1.0, 5.0, 2.0]  # 10 -> 8 / 4
    # random mode may choose a token already below tau / div: clamping never enlarges it
    factor, chosen = suppress_factors(**_args([1.0], 8.0, clamp_action=clamp[:1],
                                              random_mode=clamp[:1], draws=torch.zeros(1),
                                              p=torch.ones(1)))
    assert chosen.tolist() == [True] and factor.tolist() == [1.0]


def test_ineligible_tokens_are_untouched():
    factor, chosen = suppress_factors(**_args([5.0, 5.0], 1.0,
                                              eligible=torch.tensor([False, True])))
    assert chosen.tolist() == [False, True] and factor[0] == 1.0


def test_random_mode_uses_draws_not_norms():
    factor, chosen = suppress_factors(**_args([0.0, 0.0, 100.0], 1.0,
                                              random_mode=torch.ones(3, dtype=bool),
                                              draws=torch.tensor([0.01, 0.5, 0.9]),
                                              p=torch.full((3,), 0.05)))
    assert chosen.tolist() == [True, False, False]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0.1, 10.0), min_size=2, max_size=6), st.floats(0.0, 2.0))
def test_scaling_writes_back_through_hidden_only(values, f):
    gen = torch.Generator().manual_seed(len(values))
    hidden = torch.randn(len(values), 8, generator=gen)
    residual = torch.randn(len(values), 8, generator=gen)
    before_res = residual.clone()
    x = residual_stream(hidden, residual)
    factor = torch.tensor([f] + [1.0] * (len(values) - 1))
    chosen = torch.tensor([True, False] + [True] * (len(values) - 2))
    h0 = hidden.clone()
    new = scale_residual_stream(hidden, residual, factor, chosen)
    assert torch.equal(residual, before_res) and torch.equal(hidden, h0)  # inputs untouched
    torch.testing.assert_close(residual_stream(new, residual)[0], f * x[0], atol=1e-5,
                               rtol=1e-5)
    assert torch.equal(new[1:], h0[1:])  # unchosen tokens and factor 1 keep the exact bits


def test_norms_are_float32_over_hidden_dim():
    h = torch.ones(3, 4, dtype=torch.bfloat16)
    r = torch.ones(3, 4, dtype=torch.bfloat16)
    n = token_norms(h, r)
    assert n.dtype == torch.float32 and n.tolist() == [4.0, 4.0, 4.0]
    assert token_norms(h, None).tolist() == [2.0, 2.0, 2.0]


def test_draws_depend_only_on_seed_layer_and_position():
    seed = torch.tensor([7, 7, 8], dtype=torch.int64)
    pos = torch.tensor([3, 3, 3])
    u = rng.uniform(seed, rng.STREAM_SUPPRESS, 2, pos)
    assert u[0] == u[1] and u[0] != u[2]
    # the same token drawn in another batch layout gives the same number
    u2 = rng.uniform(seed[[2, 0]], rng.STREAM_SUPPRESS, 2, pos[[2, 0]])
    assert u2.tolist() == [u[2].item(), u[0].item()]
    assert rng.uniform(seed, rng.STREAM_TTTS, 2, pos)[0] != u[0]
    big = rng.uniform(torch.arange(200_000), rng.STREAM_SUPPRESS, 0, torch.zeros(200_000))
    assert 0.0 <= float(big.min()) and float(big.max()) < 1.0
    assert abs(float(big.mean()) - 0.5) < 0.01
    assert abs(float((big < 0.05).float().mean()) - 0.05) < 0.003


@pytest.mark.parametrize("method,stream", [("suppress", rng.STREAM_SUPPRESS),
                                           ("ttts", rng.STREAM_TTTS)])
def test_the_host_key_of_an_admitted_request_gives_the_draws_of_its_stream(method, stream):
    # the layer step draws from the key computed in numpy at admission
    cfg = TelltaleConfig.from_env({"VLLM_PATCH": method})
    seed = 2**62 + 12345
    row = request_row(cfg, num_layers=5, seed=seed)
    position = torch.tensor([0, 9, 10**6])
    for layer in range(5):
        expect = rng.uniform(torch.full_like(position, seed), stream, layer, position)
        got = rng.draw(torch.from_numpy(row.rng_key[[layer]]), position)
        assert torch.equal(got, expect)
