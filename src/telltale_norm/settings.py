"""The table of settings: every environment variable of SPEC.md, its parser and its
per-request keys.

Each `Setting` names its environment variable, the `TelltaleConfig` field it fills, the
parser that turns a raw value (a string from the environment, a str/int/float from a
request) into the typed value, and the `telltale_<name>` request keys that override it. The
environment and requests share this one table (config.py), so a value is validated by the
same rule wherever it comes from, and every error names the variable (or request key), the
value and what is allowed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
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


def parse_setting(setting: Setting, raw: Any, name: str) -> Any:
    """`raw` parsed by `setting`; a ConfigError naming `name` (variable or key) if invalid."""
    try:
        return setting.parse(raw)
    except ValueError as err:
        raise ConfigError(f"{name}={raw!r} is not valid: {err}") from None
