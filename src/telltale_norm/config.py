"""Configuration: every environment variable of SPEC.md, parsed once into a frozen object.

The environment gives server-wide defaults (`TelltaleConfig.from_env`); a request overrides
them with flat `telltale_<name>` keys in `SamplingParams.extra_args`
(`TelltaleConfig.with_request`). Both paths share one table of `Setting`s, so a value is
validated by the same rule wherever it comes from, and every error names the variable (or
request key), the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

METHODS = ("off", "monitor", "loop", "ttts", "rerank", "suppress")
METHOD_ALIASES = {"rr": "loop", "erss": "ttts", "none": "off", "0": "off", "": "off"}
RERANK_METRICS = ("A", "B", "C", "D", "mean")
RERANK_SPANS = ("all", "reasoning", "answer")
REQUEST_PREFIX = "telltale_"


class ConfigError(ValueError):
    """A setting has a value outside what is allowed. The message says which, and why."""


def normalize_method(value: str) -> str:
    """Map a `VLLM_PATCH` value (aliases of the research code included) to a method name."""
    name = str(value).strip().lower()
    name = METHOD_ALIASES.get(name, name)
    if name not in METHODS:
        raise ValueError(
            f"allowed: {', '.join(METHODS)} (aliases: rr=loop, erss=ttts; none/0/empty=off)"
        )
    return name


# ---------------------------------------------------------------- value parsers
# Each takes the raw value (a string from the environment, or a str/int/float from a request)
# and returns the typed value, raising ValueError("allowed: ...") when it is not allowed.


def _number(kind: type, lo: float | None = None, hi: float | None = None,
            lo_open: bool = False, hi_open: bool = False) -> Callable[[Any], Any]:
    def bounds() -> str:
        parts = []
        if lo is not None:
            parts.append(f"{'>' if lo_open else '>='} {lo:g}")
        if hi is not None:
            parts.append(f"{'<' if hi_open else '<='} {hi:g}")
        return f"allowed: {'an integer' if kind is int else 'a number'}" + (
            f" {' and '.join(parts)}" if parts else "")

    def parse(raw: Any) -> Any:
        if isinstance(raw, bool):
            raise ValueError(bounds())
        try:
            value = float(str(raw).strip())
        except ValueError:
            raise ValueError(bounds()) from None
        if math.isnan(value) or (kind is int and not value.is_integer()):
            raise ValueError(bounds())
        if (lo is not None and (value < lo or (lo_open and value == lo))) or (
            hi is not None and (value > hi or (hi_open and value == hi))
        ):
            raise ValueError(bounds())
        return int(value) if kind is int else value

    return parse


def _flag(raw: Any) -> bool:
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("allowed: 1/0, true/false, yes/no, on/off")


def _choice(*choices: str, upper: bool = False) -> Callable[[Any], str]:
    def parse(raw: Any) -> str:
        text = str(raw).strip()
        text = text.upper() if upper and text.lower() != "mean" else text.lower()
        if text not in choices:
            raise ValueError(f"allowed: {', '.join(choices)}")
        return text

    return parse


def _method(raw: Any) -> str:
    return normalize_method(raw)


def _layers(raw: Any) -> tuple[int, ...] | None:
    text = str(raw).strip()
    if not text:
        return None
    try:
        layers = tuple(int(part) for part in text.replace(" ", "").split(",") if part != "")
    except ValueError:
        raise ValueError("allowed: comma-separated 0-based decoder-layer indices, e.g. 21,22,23")
    if not layers or any(layer < 0 for layer in layers):
        raise ValueError("allowed: comma-separated non-negative decoder-layer indices")
    return tuple(sorted(set(layers)))


def _tau_json(raw: Any) -> tuple[tuple[int, float], ...] | None:
    text = raw if isinstance(raw, str) else json.dumps(raw)
    if not text.strip():
        return None
    allowed = 'allowed: a JSON object of layer index -> tau >= 0, e.g. {"21": 1300, "22": 1550}'
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"malformed JSON ({err.msg} at char {err.pos}); {allowed}") from None
    if not isinstance(obj, dict) or not obj:
        raise ValueError(allowed)
    pairs = []
    for key, value in obj.items():
        try:
            layer = int(key)
            tau = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"entry {key!r}: {value!r}; {allowed}") from None
        if layer < 0 or math.isnan(tau) or tau < 0 or isinstance(value, bool):
            raise ValueError(f"entry {key!r}: {value!r}; {allowed}")
        pairs.append((layer, tau))
    return tuple(sorted(pairs))


def _token_name(raw: Any) -> str:
    text = str(raw).strip()
    if not text or any(c.isspace() for c in text):
        raise ValueError("allowed: one token of the tokenizer, e.g. <think>")
    return text


def _optional_path(raw: Any) -> str | None:
    text = str(raw).strip()
    return text or None


@dataclass(frozen=True)
class Setting:
    """One configurable value: its environment variable, parser, and per-request keys."""

    env: str
    field: str
    parse: Callable[[Any], Any]
    per_request: bool = True
    # Request keys: the primary one first. Derived from `env` unless given.
    keys: tuple[str, ...] = ()


def _request_keys(env: str, primary: str) -> tuple[str, ...]:
    # SPEC: telltale_<name>, <name> the variable's lower-case name without its method prefix.
    # The full lower-case name is accepted as well, so no reading of "prefix" is wrong.
    full = env.lower()
    names = [primary, full]
    for prefix in ("vllm_patch_", "patched_", "loop_", "ttts_", "rerank_", "vllm_suppress_",
                   "vllm_"):
        if full.startswith(prefix) and full != prefix.rstrip("_"):
            names.append(full[len(prefix):])
    return tuple(dict.fromkeys(REQUEST_PREFIX + name for name in names))


_SETTINGS_SPEC: list[tuple[str, str, Callable[[Any], Any], bool, str]] = [
    # env, field, parser, per_request, primary request name
    ("VLLM_PATCH", "method", _method, True, "method"),
    ("PATCHED_LAYERS", "layers", _layers, True, "layers"),
    ("PATCHED_TAU_JSON", "tau_json", _tau_json, True, "tau_json"),
    ("ADAPTIVE", "adaptive", _flag, True, "adaptive"),
    ("ADAPTIVE_WARMUP_STEPS", "adaptive_warmup_steps", _number(int, 0), True,
     "adaptive_warmup_steps"),
    ("ADAPTIVE_IQR_K", "adaptive_iqr_k", _number(float, 0), True, "adaptive_iqr_k"),
    ("ADAPTIVE_MIN_IQR", "adaptive_min_iqr", _number(float, 0), True, "adaptive_min_iqr"),
    ("ADAPTIVE_TAU_FLOOR", "adaptive_tau_floor", _number(float, 0), True, "adaptive_tau_floor"),
    ("VLLM_PATCH_STATE_PATH", "state_path", _optional_path, True, "state_path"),
    ("VLLM_PATCH_Q", "q", _number(float, 0, 1, lo_open=True, hi_open=True), True, "q"),
    ("LOOP_MAX_EXTRA", "loop_max_extra", _number(int, 0, 64), True, "max_extra"),
    ("LOOP_GROWTH_EPS", "loop_growth_eps", _number(float), True, "growth_eps"),
    ("LOOP_BLOWUP", "loop_blowup", _number(float, 1), True, "blowup"),
    ("LOOP_ALPHA", "loop_alpha", _number(float, 0, 1, lo_open=True), True, "alpha"),
    ("TTTS_LOW_K", "ttts_low_k", _number(int, 1), True, "low_k"),
    ("TTTS_GAMMA", "ttts_gamma", _number(float, 0), True, "gamma"),
    ("TTTS_P_INJECT", "ttts_p_inject", _number(float, 0, 1), True, "p_inject"),
    ("TTTS_BETA", "ttts_beta", _number(float), True, "beta"),
    ("TTTS_COOLDOWN", "ttts_cooldown", _number(int, 0), True, "cooldown"),
    ("TTTS_BANK_K", "ttts_bank_k", _number(int, 1, 4096), True, "bank_k"),
    ("TTTS_COS_MIN", "ttts_cos_min", _number(float, -1, 1), True, "cos_min"),
    # injections kept per request to replay after a preemption (engine-wide: preallocated)
    ("TTTS_REPLAY_LOG", "ttts_replay_log", _number(int, 0, 65536), False, "replay_log"),
    ("RERANK_METRIC", "rerank_metric", _choice(*RERANK_METRICS, upper=True), True, "metric"),
    ("RERANK_LAYER_AGG", "rerank_layer_agg", _choice("sum", "mean"), True, "layer_agg"),
    ("RERANK_LATE_FRAC", "rerank_late_frac", _number(float, 0, 1, lo_open=True), True,
     "late_frac"),
    # server-side best-of: k candidates sampled per prompt, the LRS choice returned
    ("RERANK_BEST_OF", "rerank_best_of", _number(int, 1, 64), True, "best_of"),
    # k greedy candidates would be identical: a greedy best-of request samples at this
    ("RERANK_BEST_OF_TEMPERATURE", "rerank_best_of_temperature",
     _number(float, 0, lo_open=True), True, "best_of_temperature"),
    ("RERANK_SPAN", "rerank_span", _choice(*RERANK_SPANS), True, "span"),
    # reasoning delimiters, resolved to token ids from the tokenizer (engine-wide)
    ("RERANK_THINK_START", "rerank_think_start", _token_name, False, "think_start"),
    ("RERANK_THINK_END", "rerank_think_end", _token_name, False, "think_end"),
    ("VLLM_SUPPRESS_MODE", "suppress_mode", _choice("high_norm", "random"), True,
     "suppress_mode"),
    ("VLLM_SUPPRESS_ACTION", "suppress_action", _choice("mul", "clamp"), True,
     "suppress_action"),
    ("VLLM_SUPPRESS_MUL_SCALE", "suppress_mul_scale", _number(float), True,
     "suppress_mul_scale"),
    ("VLLM_SUPPRESS_CLAMP_DIV", "suppress_clamp_div", _number(float, 0, lo_open=True), True,
     "suppress_clamp_div"),
    ("VLLM_SUPPRESS_ONLY_DECODE", "suppress_only_decode", _flag, True, "suppress_only_decode"),
    ("VLLM_RANDOM_SUPPRESS_P", "random_suppress_p", _number(float, 0, 1), True,
     "random_suppress_p"),
    ("VLLM_RANDOM_SUPPRESS_K_PER_RESPONSE", "random_suppress_k_per_response", _number(int, 0),
     True, "random_suppress_k_per_response"),
    ("VLLM_EST_AVG_DECODE_LEN", "est_avg_decode_len", _number(int, 1), True,
     "est_avg_decode_len"),
    ("VLLM_RANDOM_SEED", "random_seed", _number(int, 0, 2**31 - 1), True, "random_seed"),
    ("VLLM_PATCH_TRACE", "trace", _flag, True, "trace"),
    # decode steps kept per traced request (0: max_model_len, i.e. all); host memory only
    ("VLLM_PATCH_TRACE_MAX_STEPS", "trace_max_steps", _number(int, 0), False,
     "trace_max_steps"),
    ("VLLM_PATCH_STATS_PATH", "stats_path", _optional_path, False, "stats_path"),
    ("VLLM_PATCH_DUMP_EVERY", "dump_every", _number(int, 0), False, "dump_every"),
    # refuse vLLM versions the plugin is not tested with (else: a warning, internals checked)
    ("TELLTALE_STRICT_VLLM", "strict_vllm", _flag, False, "strict_vllm"),
    # allow loop per request on an engine started with another method (loop re-runs layers in
    # Python, so its layers leave the compiled graph and CUDA graphs become piecewise)
    ("TELLTALE_ALLOW_LOOP", "allow_loop", _flag, False, "allow_loop"),
]

SETTINGS: tuple[Setting, ...] = tuple(
    Setting(env, fld, parse, per_request, _request_keys(env, primary))
    for env, fld, parse, per_request, primary in _SETTINGS_SPEC
)
SETTINGS_BY_ENV: dict[str, Setting] = {s.env: s for s in SETTINGS}
SETTINGS_BY_FIELD: dict[str, Setting] = {s.field: s for s in SETTINGS}
REQUEST_KEYS: dict[str, Setting] = {}
for _setting in SETTINGS:
    if not _setting.per_request:
        continue
    for _key in _setting.keys:
        # A derived alias that two settings share would be ambiguous: keep the first only.
        REQUEST_KEYS.setdefault(_key, _setting)


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
                values[setting.field] = _parse(setting, environ[setting.env], setting.env)
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
            values[setting.field] = _parse(setting, raw, key)
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


def _parse(setting: Setting, raw: Any, name: str) -> Any:
    try:
        return setting.parse(raw)
    except ValueError as err:
        raise ConfigError(f"{name}={raw!r} is not valid: {err}") from None


def default_layers(num_layers: int) -> tuple[int, ...]:
    """The late band `range(L - L//4, L - 1)` of SPEC.md (28 layers -> 21..26)."""
    layers = tuple(range(num_layers - num_layers // 4, num_layers - 1))
    return layers or (max(num_layers - 1, 0),)


DEFAULT_CONFIG = TelltaleConfig()
