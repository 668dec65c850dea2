"""Which decoder layers loop (ALRR) may re-run: those a re-run leaves no state in.

Any request may ask for loop, whatever method the engine was started with, so this is
decided on every patched engine:
- the frontend, which loads no model, reads the layers with recurrent state from the HF
  config (`layer_types`, e.g. Qwen3-Next's and Qwen3.5's "linear_attention" layers) and
  refuses a loop request on them (`check_loop_request`: HTTP 400 / ValueError for that
  request alone);
- each worker inspects its loaded layers (`rerun.loop_obstacle`) at attach
  (`check_loop_layers`). It stops the engine at start when the layers with recurrent state
  are not exactly those the frontend read from the config, and when VLLM_PATCH=loop names
  a layer that cannot loop. Layers that cannot loop for another reason, which no config
  tells (an attention backend or a cache that a re-run would write), are logged at start;
  the op never re-runs them, so a loop request leaves them as they are.
"""

from __future__ import annotations

import logging

from torch import nn

from telltale_norm.config import ConfigError, TelltaleConfig
from telltale_norm.vllm_adapter.rerun import RerunUnsupportedError

logger = logging.getLogger("vllm.telltale_norm")

# Words of recurrent layer kinds in `layer_types` ("linear_attention", "mamba", "conv", ...);
# attention kinds are "full_attention", "sliding_attention", "attention", ...
_RECURRENT_WORDS = ("linear", "mamba", "conv", "recurrent", "delta", "ssm", "rwkv")


def recurrent_layers(hf_config, num_layers: int) -> dict[int, str]:
    """Layer index -> kind, for the layers whose kind in the HF config holds recurrent
    state. Other hybrids (Jamba, Nemotron-H, ...) have layers that do not fit the wrapper
    (no `positions`) and are refused before this matters."""
    kinds = getattr(hf_config, "layer_types", None)
    if not isinstance(kinds, (list, tuple)):
        return {}
    return {i: str(kind) for i, kind in enumerate(kinds[:num_layers])
            if any(word in str(kind).lower() for word in _RECURRENT_WORDS)}


def _summary(why: dict[int, str], allowed: list[int]) -> str:
    reasons = "; ".join(f"layer {i}: {reason}" for i, reason in sorted(why.items()))
    return f"{reasons}. Layers that may loop: {allowed or 'none'}"


def check_loop_request(request: TelltaleConfig, hf_config) -> None:
    """Raise ConfigError if a loop request names layers with recurrent state."""
    if request.method != "loop":
        return
    num_layers = int(hf_config.num_hidden_layers)
    recurrent = recurrent_layers(hf_config, num_layers)
    layers = request.patched_layers(num_layers, source="telltale_layers")
    bad = {i: f"a {recurrent[i]} layer, whose recurrent state a re-run would advance"
           for i in layers if i in recurrent}
    if bad:
        allowed = [i for i in range(num_layers) if i not in recurrent]
        raise ConfigError(
            f"telltale_method=loop cannot re-run layers {sorted(bad)} "
            f"(telltale_layers={','.join(map(str, layers))}): {_summary(bad, allowed)}; "
            "set telltale_layers to some of them")


def check_loop_layers(config: TelltaleConfig, wrapped: list[tuple[int, nn.Module]],
                      hf_config, num_layers: int) -> None:
    """At attach (see the module docstring); raises RerunUnsupportedError to stop the engine."""
    model = (getattr(hf_config, "architectures", None) or ["the model"])[0]
    obstacles = {i: layer._telltale_loop_obstacle for i, layer in wrapped
                 if layer._telltale_loop_obstacle is not None}
    why = {i: obstacle.reason for i, obstacle in obstacles.items()}
    local = {i for i, _ in wrapped}
    by_config = set(recurrent_layers(hf_config, num_layers))
    # only the patched layers are wrapped: the others may loop unless the config says not
    allowed = sorted(set(range(num_layers)) - by_config - set(obstacles))
    recurrent = {i for i, obstacle in obstacles.items() if obstacle.recurrent}
    expected = by_config & local
    if recurrent != expected:
        raise RerunUnsupportedError(
            f"telltale-norm: reading the config of {model}, the frontend takes layers "
            f"{sorted(expected)} (and no others) to hold recurrent state, but the loaded "
            f"layers with recurrent state are {sorted(recurrent)} ({_summary(why, allowed)}), "
            "so loop requests would not be checked correctly. Unset VLLM_PATCH to run this "
            "model without telltale-norm.")
    bad = {i: why[i] for i in config.patched_layers(num_layers) if i in obstacles}
    if config.method == "loop" and bad:
        raise RerunUnsupportedError(
            f"telltale-norm: VLLM_PATCH=loop cannot re-run layers {sorted(bad)} of {model}: "
            f"{_summary(bad, allowed)}. Set PATCHED_LAYERS to some of those, or use another "
            "method on these layers.")
    others = {i: reason for i, reason in why.items() if i not in recurrent}
    if others:
        logger.warning("telltale-norm: loop requests will not re-run layers %s: %s",
                       sorted(others), _summary(others, allowed))
