"""Which decoder layers loop (ALRR) may re-run: those a re-run leaves no state in.

Any request may ask for loop, whatever method the engine was started with, so this is
decided on every patched engine, twice:
- the frontend, which loads no model, reads the layers with recurrent state from the HF
  config (`layer_types`, e.g. Qwen3-Next's and Qwen3.5's "linear_attention" layers) and
  refuses a loop request on them (`check_loop_request`: HTTP 400 / ValueError for that
  request alone);
- each worker inspects its loaded layers (`rerun.loop_obstacle`) at attach and stops the
  engine at start when that inspection and the config disagree (the frontend would accept
  requests the worker cannot serve, or the other way round), or when VLLM_PATCH=loop names
  layers that cannot loop (`check_loop_layers`).
"""

from __future__ import annotations

from torch import nn

from telltale_norm.config import ConfigError, TelltaleConfig
from telltale_norm.vllm_adapter.rerun import RerunUnsupportedError

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


def check_loop_request(request: TelltaleConfig, model_config) -> None:
    """Raise ConfigError if a loop request names layers with recurrent state."""
    if request.method != "loop":
        return
    config = model_config.hf_text_config
    num_layers = int(config.num_hidden_layers)
    recurrent = recurrent_layers(config, num_layers)
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
                      model_config, num_layers: int) -> None:
    """At attach: the loaded layers must agree with `recurrent_layers`, and VLLM_PATCH=loop
    must name only layers that can loop. Raises RerunUnsupportedError (the engine stops)."""
    model = getattr(model_config, "architecture", "the model")
    obstacles = {i: layer._telltale_loop_obstacle for i, layer in wrapped
                 if layer._telltale_loop_obstacle}
    local = {i for i, _ in wrapped}
    allowed = sorted(local - set(obstacles))
    expected = {i for i in recurrent_layers(model_config.hf_text_config, num_layers)
                if i in local}
    if set(obstacles) != expected:
        raise RerunUnsupportedError(
            f"telltale-norm: the frontend, reading the config of {model}, expects layers "
            f"{sorted(expected)} and no others to be unable to loop (ALRR), but the loaded "
            f"layers say: {_summary(obstacles, allowed)}. Loop requests could then reach "
            "layers that a re-run would leave state in, so the engine does not start. "
            "Unset VLLM_PATCH to run this model (or this attention backend) without "
            "telltale-norm.")
    if config.method != "loop":
        return
    bad = {i: obstacles[i] for i in config.patched_layers(num_layers) if i in obstacles}
    if bad:
        raise RerunUnsupportedError(
            f"telltale-norm: VLLM_PATCH=loop cannot re-run layers {sorted(bad)} of {model}: "
            f"{_summary(bad, allowed)}. Set PATCHED_LAYERS to some of those, or use another "
            "method on these layers.")
