"""vllm_adapter/layers.py on small torch modules, eager and under torch.compile(fullgraph=True)
(how vLLM compiles a model): which layer signatures fit, how a call is recorded for re-runs,
and the refusal of a layer that does not return (hidden_states, residual).

The runtime is not attached (`state.RUNTIME` is None), so the op only passes the output on.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from telltale_norm.vllm_adapter import rerun, state
from telltale_norm.vllm_adapter.layers import (
    UnsupportedModelError, core_slots, find_decoder_layers, wrap_decoder_layers)


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)


class Attentionless(Layer):
    """A decoder layer in gpt-oss's argument order with extra arguments of each kind."""

    def forward(self, hidden_states, positions, residual, scale=None, shift=0, *,
                gate: torch.Tensor | None = None):
        residual = hidden_states if residual is None else residual + hidden_states
        out = self.proj(residual) * (1 if scale is None else scale) + shift
        return (out if gate is None else out * gate), residual


class PairWithNone(Layer):
    def forward(self, positions, hidden_states, residual):  # like MiniCPM and Gemma4
        return self.proj(hidden_states), None


class NoPositions(Layer):
    def forward(self, hidden_states, residual, **kwargs):  # like a Mamba layer
        return self.proj(hidden_states), hidden_states


class Model(nn.Module):
    def __init__(self, layer: type[nn.Module], n: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList([layer() for _ in range(n)])

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        residual = None
        scale = positions[:, None].float() / 10 + 1
        for i, layer in enumerate(self.layers):  # positionally, by keyword, mixed
            if not isinstance(layer, Attentionless):
                x, residual = layer(positions, x, residual)
            elif i == 0:
                x, residual = layer(x, positions, residual, scale, 2, gate=scale)
            else:
                x, residual = layer(residual=residual, positions=positions, hidden_states=x,
                                    scale=None)  # a None, like Mistral's t_cond
        return x if residual is None else x + residual  # MiniCPM/Gemma4 return no residual


@pytest.fixture
def wrapped(monkeypatch):
    """`wrapped(model)` wraps the model's layers and registers them as the op's layers; no
    runtime is attached (an in-process engine of an earlier test may have left one)."""
    saved = dict(state.LAYERS)
    monkeypatch.setattr(state, "RUNTIME", None)

    def wrap(model: nn.Module) -> nn.Module:
        state.LAYERS.clear()
        state.LAYERS.update(wrap_decoder_layers(model))
        return model

    yield wrap
    state.LAYERS.clear()
    state.LAYERS.update(saved)


def test_core_arguments_are_found_by_name():
    assert core_slots(Attentionless()) == (0, 2, 1)
    assert core_slots(PairWithNone()) == (1, 2, 0)
    assert core_slots(NoPositions()) is None
    with pytest.raises(UnsupportedModelError, match=r"NoPositions\.forward\(hidden_states, "
                                                    r"residual, \*\*kwargs\)\) do not take"):
        find_decoder_layers(Model(NoPositions))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_rerun_rebuilds_the_first_call(wrapped, compiled):
    torch.manual_seed(0)
    model = Model(Attentionless)
    x, positions = torch.randn(5, 8), torch.arange(5)
    with torch.no_grad():
        want = model(x, positions)
        wrapped(model)
        got = (torch.compile(model, fullgraph=True) if compiled else model)(x, positions)
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # the op changed nothing
    first, second = model.layers
    # layer 0: positional call with a tensor, a constant and a keyword tensor
    assert first._telltale_call == {"num_args": 5, "core": (0, 2, 1),
                                    "tensor_keys": (3, "gate"), "constants": {4: 2}}
    # layer 1: keywords only, a None among them (an op input like the tensors)
    assert second._telltale_call == {"num_args": 0, "tensor_keys": ("scale",), "constants": {},
                                     "core": ("hidden_states", "residual", "positions")}
    # the rebuilt call equals a direct call with the same arguments
    scale = positions[:, None].float() / 10 + 1
    h, r = torch.randn(5, 8), torch.randn(5, 8)
    with torch.no_grad():
        again = rerun.call_layer(first, positions, [scale, scale], h, r)
        direct = first._telltale_original_forward(h, positions, r, scale, 2, gate=scale)
    for a, b in zip(again, direct):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_layer_returning_none_is_refused_with_its_signature(wrapped, compiled):
    model = wrapped(Model(PairWithNone, n=1))
    run = torch.compile(model, fullgraph=True) if compiled else model
    with pytest.raises(UnsupportedModelError, match=r"cannot patch model architecture Model: "
                                                    r"layer 0 \(PairWithNone\.forward\(positions, "
                                                    r"hidden_states, residual\)\) does not "
                                                    r"return \(hidden_states, residual\)"):
        with torch.no_grad():
            run(torch.randn(3, 8), torch.arange(3))
