"""Configuration: every environment variable of SPEC.md, parsed once into a frozen object.

The environment gives server-wide defaults (`TelltaleConfig.from_env`); a request overrides
them with flat `telltale_<name>` keys in `SamplingParams.extra_args`
(`TelltaleConfig.with_request`). Both paths read one table of `Setting`s (settings.py), so
a value is validated by the same rule wherever it comes from, and every error names the
variable (or request key), the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# the table's names are re-exported: callers import them from here
from telltale_norm.settings import (  # noqa: F401
    METHOD_ALIASES,
    METHODS,
    REQUEST_KEYS,
    REQUEST_PREFIX,
    RERANK_METRICS,
    RERANK_SPANS,
    SETTINGS,
    SETTINGS_BY_ENV,
    SETTINGS_BY_FIELD,
    ConfigError,
    Setting,
    normalize_method,
    parse_setting,
)


@dataclass(frozen=True)
class TelltaleConfig:
    """Validated, immutable settings of telltale-norm. Defaults are those of SPEC.md."""

    method: str = "off"
    layers: tuple[int, ...] | None = None
    tau_json: tuple[tuple[int, float], ...] | None = None
    adaptive: bool = False
    adaptive_warmup_steps: int | None = None
    adaptive_iqr_k: float = 1.5
    adaptive_min_iqr: float = 1e-3
    adaptive_tau_floor: float = 0.0
    state_path: str | None = None
    q: float | None = None
    loop_max_extra: int = 1
    loop_growth_eps: float = 0.2
    loop_blowup: float = 1.5
    loop_alpha: float = 1.0
    ttts_low_k: int = 40
    ttts_gamma: float = 1.0
    ttts_p_inject: float = 0.2
    ttts_beta: float = 0.5
    ttts_cooldown: int = 32
    ttts_bank_k: int = 32
    ttts_cos_min: float = 0.5
    ttts_replay_log: int = 128
    # The length-normalised mean norm: A grows with answer length, so raw sums prefer long
    # answers; the mean compares candidates of different lengths fairly.
    rerank_metric: str = "mean"
    rerank_layer_agg: str = "sum"
    rerank_late_frac: float = 0.30
    rerank_best_of: int = 1
    rerank_best_of_temperature: float = 0.7
    rerank_span: str = "all"
    rerank_think_start: str = "<think>"
    rerank_think_end: str = "</think>"
    suppress_mode: str = "high_norm"
    suppress_action: str = "mul"
    suppress_mul_scale: float = 0.1
    suppress_clamp_div: float = 4.0
    suppress_only_decode: bool = True
    random_suppress_p: float = 0.05
    random_suppress_k_per_response: int = 0
    est_avg_decode_len: int = 512
    random_seed: int = 1234
    # Keep per-request norm traces for traces(llm) (rerank rows are pushed regardless).
    trace: bool = False
    trace_max_steps: int = 0
    stats_path: str | None = None
    dump_every: int = 0
    strict_vllm: bool = False
    allow_loop: bool = False
    # Calibrated tau read from `state_path` at `q` (layer -> tau); filled by validation.
    calibrated_tau: tuple[tuple[int, float], ...] | None = field(default=None, compare=False)

    # ------------------------------------------------------------ construction
    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TelltaleConfig:
        """Parse every telltale variable of `environ` (default: `os.environ`)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for setting in SETTINGS:
            if setting.env in environ:
                values[setting.field] = parse_setting(setting, environ[setting.env], setting.env)
        return cls(**values)._validated(source="environment")

    def with_request(self, extra_args: Mapping[str, Any] | None) -> TelltaleConfig:
        """This config with a request's `telltale_*` keys applied (other keys are ignored)."""
        if not extra_args:
            return self
        values: dict[str, Any] = {}
        for key, raw in extra_args.items():
            if not isinstance(key, str) or not key.startswith(REQUEST_PREFIX):
                continue
            setting = REQUEST_KEYS.get(key)
            if setting is None:
                raise ConfigError(
                    f"unknown request setting {key}={raw!r}; allowed keys: "
                    + ", ".join(s.keys[0] for s in SETTINGS if s.per_request)
                )
            values[setting.field] = parse_setting(setting, raw, key)
        if not values:
            return self
        return dataclasses.replace(self, calibrated_tau=None, **values)._validated(
            source="request")

    def _validated(self, source: str) -> TelltaleConfig:
        def name(fld: str) -> str:
            setting = SETTINGS_BY_FIELD[fld]
            return setting.env if source == "environment" else setting.keys[0]

        if self.layers is not None and self.tau_json is not None:
            extra = sorted({layer for layer, _ in self.tau_json} - set(self.layers))
            if extra:
                raise ConfigError(
                    f"{name('tau_json')}={json.dumps(dict(self.tau_json))} names layers "
                    f"{extra} that are not patched; allowed: layers of {name('layers')}="
                    f"{','.join(map(str, self.layers))}"
                )
        if (self.state_path is None) != (self.q is None):
            missing = "q" if self.q is None else "state_path"
            raise ConfigError(
                f"{name('state_path')}={self.state_path!r} and {name('q')}={self.q!r}: "
                f"calibrated tau needs both; set {name(missing)}"
            )
        if self.state_path is not None and self.calibrated_tau is None:
            from telltale_norm.thresholds import load_calibrated_tau

            try:
                taus = load_calibrated_tau(self.state_path, self.q)
            except ValueError as err:
                raise ConfigError(f"{name('state_path')}={self.state_path!r}: {err}") from None
            return dataclasses.replace(self, calibrated_tau=tuple(sorted(taus.items())))
        return self

    # ------------------------------------------------------------ derived values
    @property
    def active(self) -> bool:
        return self.method != "off"

    @property
    def loop_possible(self) -> bool:
        """Whether requests may use loop on an engine started with this config."""
        return self.method == "loop" or self.allow_loop

    def graph_key(self, num_layers: int) -> dict[str, Any]:
        """The settings that shape the plugin's part of the compiled graph (which layers
        hold the step, where loop's op sits, the buffers' shapes). Everything else (tau,
        probabilities, seeds, paths, per-request defaults) is data in the step's tables."""
        return {"layers": list(self.patched_layers(num_layers)), "loop": self.loop_possible,
                "bank_k": self.ttts_bank_k, "replay_log": self.ttts_replay_log}

    @property
    def warmup_steps(self) -> int:
        if self.adaptive_warmup_steps is not None:
            return self.adaptive_warmup_steps
        return 200 if self.method == "ttts" else 500

    def patched_layers(self, num_layers: int, source: str = "PATCHED_LAYERS") -> tuple[int, ...]:
        """The patched layers of a `num_layers`-layer model, checked against its range.

        `source` names the setting in the error (the variable, or the request key)."""
        if self.layers is not None:
            layers = self.layers
        elif self.tau_json is not None:
            layers = tuple(layer for layer, _ in self.tau_json)
        else:
            layers = default_layers(num_layers)
        bad = [layer for layer in layers if not 0 <= layer < num_layers]
        if bad:
            raise ConfigError(
                f"{source}={','.join(map(str, layers))}: layers {bad} are outside the "
                f"model; allowed: 0..{num_layers - 1} (the model has {num_layers} decoder layers)"
            )
        return layers

    def fixed_tau(self) -> dict[int, float]:
        """Per-layer fixed tau (PATCHED_TAU_JSON, else calibrated); empty means adaptive."""
        if self.adaptive:
            return {}
        if self.tau_json is not None:
            return dict(self.tau_json)
        if self.calibrated_tau is not None:
            return dict(self.calibrated_tau)
        return {}

    def to_env(self) -> dict[str, str]:
        """The environment variables that reproduce this config (for child processes)."""
        env: dict[str, str] = {}
        for setting in SETTINGS:
            value = getattr(self, setting.field)
            if value == getattr(DEFAULT_CONFIG, setting.field):
                continue
            if setting.field == "layers":
                env[setting.env] = ",".join(map(str, value))
            elif setting.field == "tau_json":
                env[setting.env] = json.dumps({str(k): v for k, v in value})
            elif isinstance(value, bool):
                env[setting.env] = "1" if value else "0"
            else:
                env[setting.env] = str(value)
        return env

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary (logged at start, hashed into vLLM's compile cache key)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["tau_json"] = dict(self.tau_json) if self.tau_json else None
        out["calibrated_tau"] = dict(self.calibrated_tau) if self.calibrated_tau else None
        return out


def check_request(request: TelltaleConfig, engine: TelltaleConfig, num_layers: int) -> None:
    """Raise ConfigError if a request's settings cannot run on this engine.

    The per-layer step exists on the engine's patched layers only (it is compiled into
    them, and ttts banks are allocated for them), so a request acts on a subset of those
    layers; banks are also sized by the engine's TTTS_BANK_K.
    """
    layers = request.patched_layers(num_layers, source="telltale_layers")
    if request.method == "off":
        return
    if request.method == "loop" and not engine.loop_possible:
        raise ConfigError(
            f"telltale_method=loop: this engine was started with VLLM_PATCH={engine.method}, "
            "where loop is not possible (its re-runs need Python at the patched layers, so "
            "they leave the compiled graph); allowed: another method, or start the engine "
            "with VLLM_PATCH=loop, or with TELLTALE_ALLOW_LOOP=1 to allow loop per request")
    engine_layers = engine.patched_layers(num_layers)
    outside = sorted(set(layers) - set(engine_layers))
    if outside:
        raise ConfigError(
            f"telltale_layers={','.join(map(str, layers))}: layers {outside} are not patched "
            f"on this engine; allowed: a subset of its PATCHED_LAYERS {list(engine_layers)} "
            "(start the engine with PATCHED_LAYERS covering every layer requests may use)")
    if request.method == "ttts" and request.ttts_bank_k > engine.ttts_bank_k:
        raise ConfigError(
            f"telltale_bank_k={request.ttts_bank_k}: banks are preallocated; allowed: "
            f"<= the server's TTTS_BANK_K={engine.ttts_bank_k}")


def default_layers(num_layers: int) -> tuple[int, ...]:
    """The late band `range(L - L//4, L - 1)` of SPEC.md (28 layers -> 21..26)."""
    layers = tuple(range(num_layers - num_layers // 4, num_layers - 1))
    return layers or (max(num_layers - 1, 0),)


DEFAULT_CONFIG = TelltaleConfig()
