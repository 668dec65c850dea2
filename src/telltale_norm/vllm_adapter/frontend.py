"""Frontend-side patches (the process that builds the engine config and accepts requests).

- `EngineArgs.create_engine_config`: validate the environment against the real model (layer
  range) before any engine process starts; put the config into vLLM's compile-cache key;
  adapt or refuse the deployment's settings (`deployment.py`: async scheduling, CUDA graphs,
  model runner, speculative decoding, ...).
- `InputProcessor._validate_params`: reject a request with bad `telltale_*` settings with a
  400-class error for that request alone, before it reaches a worker.
- `InputProcessor.process_inputs`: give requests whose method edits hidden states their own
  prefix-cache salt, so their edited KV blocks are never reused by other settings.
- `LLM.generate`: append the statistics to a `.jsonl` stats file every
  `VLLM_PATCH_DUMP_EVERY` calls.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging

from telltale_norm.config import REQUEST_PREFIX, ConfigError, TelltaleConfig, check_request
from telltale_norm.vllm_adapter import best_of, deployment, internals
from telltale_norm.vllm_adapter.loop_layers import check_loop_request

logger = logging.getLogger("vllm.telltale_norm")


CONFIG_KEY = "telltale_norm"


class RequestSettingsError(internals.require("VLLMValidationError"), ValueError):
    """Bad `telltale_*` request settings: HTTP 400 in the server, a ValueError offline."""


def engine_config(vllm_config) -> TelltaleConfig:
    """The settings an engine was created with; inactive (method off) when it was created
    without VLLM_PATCH, whatever the environment says now."""
    env = (vllm_config.additional_config or {}).get(CONFIG_KEY)
    return TelltaleConfig() if env is None else _parsed(tuple(sorted(env.items())))


@functools.lru_cache(maxsize=8)
def _parsed(env: tuple[tuple[str, str], ...]) -> TelltaleConfig:
    # Asked for on every request (validation, cache salt): parse each engine's settings once.
    return TelltaleConfig.from_env(dict(env))


def _num_layers(model_config) -> int:
    return int(model_config.hf_text_config.num_hidden_layers)


def _create_engine_config(original):
    def create_engine_config(self, *args, **kwargs):
        config = TelltaleConfig.from_env()
        if not config.active:
            return original(self, *args, **kwargs)
        # The settings travel to every engine process inside the engine config; vLLM hashes
        # their graph-shaping part into its compile-cache key (see `_compute_hash`), so a
        # graph compiled without the plugin, or for other layers, is never reused.
        self.additional_config = {**(self.additional_config or {}),
                                  CONFIG_KEY: config.to_env()}
        deployment.prepare(self)
        vllm_config = original(self, *args, **kwargs)
        layers = config.patched_layers(_num_layers(vllm_config.model_config))
        deployment.adapt(vllm_config, config.loop_possible)
        logger.info("telltale-norm: VLLM_PATCH=%s on layers %s (%s)", config.method,
                    list(layers), _tau_summary(config))
        return vllm_config

    return create_engine_config


def _compute_hash(original):
    def compute_hash(self, *args, **kwargs):
        # vLLM keys its compile cache by this hash, additional_config included. Hash only the
        # settings that shape the plugin's part of the graph, so another tau, seed or
        # probability reuses the compiled graph instead of compiling again.
        extra = self.additional_config
        env = extra.get(CONFIG_KEY) if isinstance(extra, dict) else None
        if env is None:
            return original(self, *args, **kwargs)
        key = engine_config(self).graph_key(_num_layers(self.model_config))
        self.additional_config = {**extra, CONFIG_KEY: key}
        try:
            return original(self, *args, **kwargs)
        finally:
            self.additional_config = extra

    return compute_hash


def _tau_summary(config: TelltaleConfig) -> str:
    fixed = config.fixed_tau()
    if fixed:
        return "fixed tau " + json.dumps({str(k): round(v, 3) for k, v in fixed.items()})
    return (f"adaptive tau, IQR k={config.adaptive_iqr_k}, warm-up "
            f"{config.warmup_steps} decode steps")


def _validate_params(original):
    def validate_params(self, params, *args, **kwargs):
        result = original(self, params, *args, **kwargs)
        extra_args = getattr(params, "extra_args", None)
        if extra_args and any(str(k).startswith(REQUEST_PREFIX) for k in extra_args):
            engine = engine_config(self.vllm_config)
            if not engine.active:  # an unpatched engine ignores telltale_* settings
                return result
            try:
                request = engine.with_request(extra_args)
                check_request(request, engine, _num_layers(self.model_config))
                check_loop_request(request, self.model_config.hf_text_config)
            except ConfigError as err:
                raise RequestSettingsError(f"telltale-norm: {err}") from None
        return result

    return validate_params


# Methods whose edits reach the KV cache (later layers' keys and values, later tokens).
EDITING_METHODS = frozenset({"suppress", "loop", "ttts"})


def kv_cache_salt(config: TelltaleConfig, num_layers: int, seed: int | None,
                  request_id: str) -> str | None:
    """The prefix-cache salt of a request with these effective settings, None if it edits
    nothing. vLLM keys cached blocks by token ids (and the salt) only; requests with equal
    settings and seed make equal edits and may share blocks, except under an adaptive tau,
    whose value depends on all traffic so far."""
    if config.method not in EDITING_METHODS:
        return None
    layers = config.patched_layers(num_layers, source="telltale_layers")
    history = request_id if set(layers) - set(config.fixed_tau()) else ""
    key = json.dumps([config.to_env(), seed, history], sort_keys=True)
    return "telltale-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def _process_inputs(original):
    def process_inputs(self, request_id, *args, **kwargs):
        request = original(self, request_id, *args, **kwargs)
        engine = engine_config(self.vllm_config)
        params = request.sampling_params
        if engine.active and params is not None:
            best_of.prepare(params, engine, self.tokenizer)  # LRS checks, best-of -> n = k
            salt = kv_cache_salt(engine.with_request(params.extra_args),
                                 _num_layers(self.model_config), params.seed, request_id)
            if salt is not None:
                request.cache_salt = salt if request.cache_salt is None else (
                    f"{request.cache_salt}|{salt}")
        return request

    return process_inputs


def _generate(original):
    def generate(self, *args, **kwargs):
        outputs = original(self, *args, **kwargs)
        config = engine_config(self.llm_engine.vllm_config)
        if config.active and config.dump_every and str(config.stats_path).endswith(".jsonl"):
            self._telltale_generate_calls = getattr(self, "_telltale_generate_calls", 0) + 1
            if self._telltale_generate_calls % config.dump_every == 0:
                self.collective_rpc("telltale_dump_stats")
        return outputs

    return generate


def install() -> None:
    """Install the frontend patches (idempotent)."""
    internals.patch("EngineArgs.create_engine_config", _create_engine_config)
    internals.patch("VllmConfig.compute_hash", _compute_hash)
    internals.patch("InputProcessor._validate_params", _validate_params)
    internals.patch("InputProcessor.process_inputs", _process_inputs)
    # VLLM_PATCH_DUMP_EVERY counts offline generate calls (lm-eval's included).
    internals.patch("LLM.generate", _generate)
