"""vllm_adapter/loop_layers.py: which layers loop may re-run, from the HF config (the
frontend) and from the loaded layers (each worker at start). Real transformers configs; the
loaded layers are stood in for by modules carrying the inspection's result (the engine
tests, tests/test_reasoning_families.py, inspect real vLLM layers)."""

from __future__ import annotations

import logging

import pytest
import transformers
from torch import nn

from telltale_norm.config import ConfigError, TelltaleConfig
from telltale_norm.vllm_adapter.loop_layers import (
    check_loop_layers, check_loop_request, recurrent_layers)
from telltale_norm.vllm_adapter.rerun import LoopObstacle, RerunUnsupportedError

HYBRID = transformers.Qwen3NextConfig(num_hidden_layers=4, architectures=["Qwen3NextForCausalLM"],
                                      layer_types=["linear_attention", "full_attention"] * 2)
DENSE = transformers.GptOssConfig(num_hidden_layers=4)  # sliding and full attention
RECURRENT = LoopObstacle("holds recurrent state (GatedDeltaNet) that every pass advances",
                         recurrent=True)
BACKEND = LoopObstacle("attention backend X writes the KV cache inside its forward",
                       recurrent=False)


def loaded(*obstacles: LoopObstacle | None) -> list[tuple[int, nn.Module]]:
    layers = []
    for index, obstacle in enumerate(obstacles):
        layer = nn.Module()
        layer._telltale_loop_obstacle = obstacle
        layers.append((index, layer))
    return layers


def test_recurrent_layers_come_from_layer_types():
    assert recurrent_layers(HYBRID, 4) == {0: "linear_attention", 2: "linear_attention"}
    assert recurrent_layers(DENSE, 4) == {}
    assert recurrent_layers(transformers.LlamaConfig(num_hidden_layers=4), 4) == {}


def test_a_loop_request_on_a_recurrent_layer_is_refused():
    loop = TelltaleConfig(method="loop")
    with pytest.raises(ConfigError, match=r"cannot re-run layers \[2\] \(telltale_layers=1,2\)"
                                          r": layer 2: a linear_attention layer.*"
                                          r"Layers that may loop: \[1, 3\]"):
        check_loop_request(loop.with_request({"telltale_layers": "1,2"}), HYBRID)
    check_loop_request(loop.with_request({"telltale_layers": "1,3"}), HYBRID)
    check_loop_request(TelltaleConfig(method="suppress", layers=(0, 2)), HYBRID)
    check_loop_request(loop.with_request({"telltale_layers": "0,2"}), DENSE)


def test_loaded_layers_must_agree_with_the_config():
    monitor = TelltaleConfig(method="monitor", layers=(1, 2))
    check_loop_layers(monitor, loaded(RECURRENT, None, RECURRENT, None), HYBRID, 4)
    with pytest.raises(RerunUnsupportedError, match=r"takes layers \[0, 2\] .* but the loaded "
                                                    r"layers with recurrent state are \[2\]"):
        check_loop_layers(monitor, loaded(None, None, RECURRENT, None), HYBRID, 4)
    with pytest.raises(RerunUnsupportedError, match=r"takes layers \[\] .*are \[1\]"):
        check_loop_layers(monitor, loaded(None, RECURRENT, None, None), DENSE, 4)
    # pipeline parallel: only the local layers are compared
    check_loop_layers(monitor, loaded(RECURRENT, None), HYBRID, 4)


def test_loop_default_on_a_layer_that_cannot_loop_stops_the_engine():
    loop = TelltaleConfig(method="loop", layers=(1, 2))
    with pytest.raises(RerunUnsupportedError, match=r"VLLM_PATCH=loop cannot re-run layers "
                                                    r"\[2\] of Qwen3NextForCausalLM: layer 2: "
                                                    r"holds recurrent state.*may loop: \[1, 3\]"):
        check_loop_layers(loop, loaded(RECURRENT, None, RECURRENT, None), HYBRID, 4)
    with pytest.raises(RerunUnsupportedError, match=r"cannot re-run layers \[1\].*backend X"):
        check_loop_layers(loop, loaded(None, BACKEND, None, None), DENSE, 4)
    check_loop_layers(TelltaleConfig(method="loop", layers=(1, 3)),
                      loaded(RECURRENT, None, RECURRENT, None), HYBRID, 4)


def test_layers_no_config_names_are_logged_not_refused(caplog):
    # e.g. a backend writing K/V inside its forward: other methods still run, loop skips it
    with caplog.at_level(logging.WARNING, logger="vllm.telltale_norm"):
        check_loop_layers(TelltaleConfig(method="monitor", layers=(1, 2)),
                          loaded(None, BACKEND, None, None), DENSE, 4)
    assert "loop requests will not re-run layers [1]: layer 1: attention backend X" in caplog.text
