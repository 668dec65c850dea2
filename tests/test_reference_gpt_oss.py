"""gpt-oss against the independent reference decoder (tests/reference_decoder.py): the
reference follows transformers (tests/test_loop.py), each gpt-oss feature of the tiny model
matters (attention sinks, the sliding window, yarn RoPE), and the plugin's loop and suppress
in a real vLLM engine agree with the reference token for token, decision for decision."""

from __future__ import annotations

import pytest
import torch

from conftest import vllm_engine
from reference_checks import loop_matches_reference, suppress_matches_reference
from reference_decoder import ReferenceDecoder, rope_frequencies

PROMPT = [1, 504, 3575, 282, 4649, 314, 2800, 28, 253, 7]  # longer than the window (8)


@pytest.fixture(scope="module")
def llm(tiny_model):
    # Monitor on the compared layers. The engine core gets its own process (vLLM's default):
    # an in-process CPU worker would pin this process's threads and slow the reference down.
    with vllm_engine(tiny_model("gpt_oss"), {"VLLM_PATCH": "monitor", "PATCHED_LAYERS": "1,2",
                                                "TELLTALE_ALLOW_LOOP": "1"},
                     kv_cache_memory_bytes=128 * 2**20) as engine:
        yield engine


def _decode_logits(ref: ReferenceDecoder, prompt: list[int], steps: int) -> torch.Tensor:
    logits = []
    ref.generate(prompt, steps, step_logits=logits)
    return torch.stack(logits)


@pytest.mark.parametrize("feature", ["sinks", "window", "yarn"])
def test_each_gpt_oss_feature_changes_the_reference(tiny_model, feature):
    """Without the feature the reference's logits move far: the tiny model exercises it, so
    the agreement with transformers and vLLM checks it."""
    ref = ReferenceDecoder(tiny_model("gpt_oss"))
    want = _decode_logits(ref, PROMPT, 16)
    if feature == "sinks":
        for weights in ref.layers:
            weights["sinks"] = None
    elif feature == "window":
        assert ref.window == [8, None, 8, None]
        ref.window = [None] * ref.num_layers
    else:
        inv_freq, scale = rope_frequencies({"rope_theta": 150000.0}, ref.head_dim)
        assert scale == 1.0
        angles = torch.arange(ref.max_len, dtype=torch.float64)[:, None] * inv_freq[None]
        ref.cos, ref.sin = angles.cos().float(), angles.sin().float()
    assert (_decode_logits(ref, PROMPT, 16) - want).abs().max() > 0.1


def test_vllm_loop_matches_reference_gpt_oss(llm, tiny_model):
    loop_matches_reference(llm, tiny_model("gpt_oss"))


@pytest.mark.parametrize("action", ["mul", "clamp"])
def test_vllm_suppress_matches_reference_gpt_oss(llm, tiny_model, action):
    suppress_matches_reference(llm, tiny_model("gpt_oss"), action)
