"""Config parsing: every malformed variable is rejected with a message naming it."""

import json

import pytest

from telltale_norm.config import (
    DEFAULT_CONFIG,
    REQUEST_KEYS,
    SETTINGS,
    ConfigError,
    TelltaleConfig,
    default_layers,
    normalize_method,
)


@pytest.mark.parametrize("value,method", [
    ("loop", "loop"), ("rr", "loop"), ("ttts", "ttts"), ("erss", "ttts"), ("rerank", "rerank"),
    ("suppress", "suppress"), ("monitor", "monitor"), ("off", "off"), ("none", "off"),
    ("0", "off"), ("", "off"), (" LOOP ", "loop"),
])
def test_method_names_of_the_research_code_are_accepted(value, method):
    assert normalize_method(value) == method
    assert TelltaleConfig.from_env({"VLLM_PATCH": value}).method == method


def test_defaults_are_those_of_the_spec():
    cfg = TelltaleConfig.from_env({})
    assert cfg.method == "off" and not cfg.active
    assert (cfg.loop_max_extra, cfg.loop_growth_eps, cfg.loop_blowup, cfg.loop_alpha) == (
        1, 0.2, 1.5, 1.0)
    assert (cfg.ttts_low_k, cfg.ttts_gamma, cfg.ttts_p_inject, cfg.ttts_beta, cfg.ttts_cooldown,
            cfg.ttts_bank_k, cfg.ttts_cos_min) == (40, 1.0, 0.2, 0.5, 32, 32, 0.5)
    assert (cfg.adaptive_iqr_k, cfg.adaptive_min_iqr, cfg.adaptive_tau_floor) == (1.5, 1e-3, 0)
    assert cfg.warmup_steps == 500
    assert TelltaleConfig.from_env({"VLLM_PATCH": "ttts"}).warmup_steps == 200
    assert (cfg.suppress_mode, cfg.suppress_action, cfg.suppress_mul_scale,
            cfg.suppress_clamp_div, cfg.suppress_only_decode) == ("high_norm", "mul", 0.1, 4.0,
                                                                  True)
    assert (cfg.random_suppress_p, cfg.est_avg_decode_len, cfg.random_seed) == (0.05, 512, 1234)
    assert cfg.rerank_layer_agg == "sum" and cfg.rerank_late_frac == 0.30


def test_default_layers_are_the_late_band():
    assert default_layers(28) == (21, 22, 23, 24, 25, 26)
    assert default_layers(30) == (23, 24, 25, 26, 27, 28)
    assert TelltaleConfig().patched_layers(30) == default_layers(30)


def test_layers_and_tau_parse():
    cfg = TelltaleConfig.from_env({"VLLM_PATCH": "loop", "PATCHED_LAYERS": "22, 21",
                                   "PATCHED_TAU_JSON": '{"21": 1300, "22": 1550.5}'})
    assert cfg.layers == (21, 22)
    assert cfg.fixed_tau() == {21: 1300.0, 22: 1550.5}
    assert TelltaleConfig.from_env({**cfg.to_env()}) == cfg
    forced = TelltaleConfig.from_env({**cfg.to_env(), "ADAPTIVE": "1"})
    assert forced.fixed_tau() == {}


def test_tau_json_alone_selects_its_layers():
    cfg = TelltaleConfig.from_env({"PATCHED_TAU_JSON": '{"3": 1, "5": 2}'})
    assert cfg.patched_layers(8) == (3, 5)


BAD_ENV = [
    ({"VLLM_PATCH": "lop"}, "VLLM_PATCH='lop'", "allowed: off, monitor, loop"),
    ({"PATCHED_LAYERS": "21,x"}, "PATCHED_LAYERS='21,x'", "allowed:"),
    ({"PATCHED_LAYERS": "-1"}, "PATCHED_LAYERS='-1'", "non-negative"),
    ({"PATCHED_TAU_JSON": "{21: 1300"}, "PATCHED_TAU_JSON", "malformed JSON"),
    ({"PATCHED_TAU_JSON": '{"21": -5}'}, "PATCHED_TAU_JSON", ">= 0"),
    ({"PATCHED_TAU_JSON": '{"21": NaN}'}, "PATCHED_TAU_JSON", ">= 0"),
    ({"PATCHED_TAU_JSON": '[1, 2]'}, "PATCHED_TAU_JSON", "JSON object"),
    ({"PATCHED_LAYERS": "21", "PATCHED_TAU_JSON": '{"22": 5}'}, "PATCHED_TAU_JSON",
     "not patched"),
    ({"VLLM_PATCH_Q": "1.5", "VLLM_PATCH_STATE_PATH": "x.json"}, "VLLM_PATCH_Q='1.5'",
     "> 0 and < 1"),
    ({"VLLM_PATCH_Q": "0", "VLLM_PATCH_STATE_PATH": "x.json"}, "VLLM_PATCH_Q='0'", "> 0"),
    ({"VLLM_PATCH_STATE_PATH": "/nonexistent/stats.json", "VLLM_PATCH_Q": "0.9"},
     "VLLM_PATCH_STATE_PATH='/nonexistent/stats.json'", "cannot read"),
    ({"LOOP_MAX_EXTRA": "two"}, "LOOP_MAX_EXTRA='two'", "an integer"),
    ({"LOOP_MAX_EXTRA": "1.5"}, "LOOP_MAX_EXTRA='1.5'", "an integer"),
    ({"TTTS_P_INJECT": "abc"}, "TTTS_P_INJECT='abc'", "a number"),
    ({"TTTS_P_INJECT": "1.2"}, "TTTS_P_INJECT='1.2'", "<= 1"),
    ({"ADAPTIVE_IQR_K": "-1"}, "ADAPTIVE_IQR_K='-1'", ">= 0"),
    ({"ADAPTIVE_TAU_FLOOR": "nan"}, "ADAPTIVE_TAU_FLOOR='nan'", "a number"),
    ({"VLLM_SUPPRESS_MODE": "all"}, "VLLM_SUPPRESS_MODE='all'", "high_norm, random"),
    ({"VLLM_SUPPRESS_ACTION": "zero"}, "VLLM_SUPPRESS_ACTION='zero'", "mul, clamp"),
    ({"RERANK_METRIC": "Z"}, "RERANK_METRIC='Z'", "A, B, C, D, mean"),
    ({"ADAPTIVE": "maybe"}, "ADAPTIVE='maybe'", "1/0"),
]


@pytest.mark.parametrize("env,names,allowed", BAD_ENV)
def test_bad_environment_is_rejected_naming_variable_value_and_allowed(env, names, allowed):
    with pytest.raises(ConfigError) as err:
        TelltaleConfig.from_env(env)
    assert names in str(err.value)
    assert allowed in str(err.value)


def test_layers_outside_the_model_are_rejected():
    cfg = TelltaleConfig.from_env({"VLLM_PATCH": "loop", "PATCHED_LAYERS": "3,30"})
    with pytest.raises(ConfigError, match=r"PATCHED_LAYERS=3,30.*\[30\].*0\.\.29"):
        cfg.patched_layers(30)


def test_request_overrides_use_spec_keys_and_the_same_rules():
    base = TelltaleConfig.from_env({"VLLM_PATCH": "monitor"})
    cfg = base.with_request({"telltale_method": "rr", "telltale_max_extra": "3",
                             "telltale_p_inject": 0.5, "telltale_layers": "1,2",
                             "telltale_tau_json": '{"1": 2.5}', "other_key": "ignored"})
    assert (cfg.method, cfg.loop_max_extra, cfg.ttts_p_inject, cfg.layers) == (
        "loop", 3, 0.5, (1, 2))
    assert cfg.fixed_tau() == {1: 2.5}
    assert base.with_request(None) is base
    with pytest.raises(ConfigError, match=r"telltale_max_extra='x'.*integer"):
        base.with_request({"telltale_max_extra": "x"})
    with pytest.raises(ConfigError, match=r"unknown request setting telltale_bogus"):
        base.with_request({"telltale_bogus": 1})
    with pytest.raises(ConfigError, match="telltale_stats_path"):
        base.with_request({"telltale_stats_path": "x"})  # engine-wide only


def test_every_per_request_setting_has_its_spec_key():
    # SPEC: telltale_<name>, the variable's name in lower case without its method prefix.
    for key in ("telltale_method", "telltale_layers", "telltale_tau_json", "telltale_max_extra",
                "telltale_growth_eps", "telltale_blowup", "telltale_alpha", "telltale_low_k",
                "telltale_gamma", "telltale_p_inject", "telltale_beta", "telltale_cooldown",
                "telltale_bank_k", "telltale_cos_min", "telltale_metric", "telltale_layer_agg",
                "telltale_late_frac", "telltale_suppress_mode", "telltale_mode",
                "telltale_suppress_action", "telltale_random_seed", "telltale_q",
                "telltale_adaptive_iqr_k", "telltale_loop_max_extra"):
        assert key in REQUEST_KEYS, key
    for setting in SETTINGS:
        assert setting.keys[0].startswith("telltale_")


def test_calibrated_tau_is_read_at_parse_time(tmp_path):
    path = tmp_path / "stats.json"
    path.write_text(json.dumps({"per_layer": {"2": {"p50": 10.0, "p90": 20.0, "p99": 30.0}}}))
    cfg = TelltaleConfig.from_env({"VLLM_PATCH_STATE_PATH": str(path), "VLLM_PATCH_Q": "0.95"})
    assert cfg.fixed_tau() == {2: pytest.approx(20.0 + 10.0 * (0.05 / 0.09))}
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="VLLM_PATCH_STATE_PATH=.*malformed JSON"):
        TelltaleConfig.from_env({"VLLM_PATCH_STATE_PATH": str(path), "VLLM_PATCH_Q": "0.5"})
    with pytest.raises(ConfigError, match="calibrated tau needs both"):
        TelltaleConfig.from_env({"VLLM_PATCH_STATE_PATH": str(path)})


def test_config_is_immutable():
    with pytest.raises(Exception):
        DEFAULT_CONFIG.method = "loop"  # type: ignore[misc]


def test_kv_cache_salt_separates_requests_whose_edits_differ():
    from telltale_norm.vllm_adapter.frontend import kv_cache_salt

    engine = TelltaleConfig.from_env({"VLLM_PATCH": "monitor", "PATCHED_LAYERS": "1,2"})
    fixed = {"telltale_tau_json": '{"1": 5, "2": 5}'}

    def salt(extra, seed=None, request_id="r1"):
        return kv_cache_salt(engine.with_request(extra), 4, seed, request_id)

    # methods that edit nothing share the cache with plain requests
    assert salt({}) is None and salt({"telltale_method": "rerank", **fixed}) is None
    suppress = {"telltale_method": "suppress", **fixed}
    assert salt(suppress) is not None
    assert salt(suppress) == salt(suppress, request_id="r2")  # same edits: shared blocks
    assert salt(suppress) != salt({**suppress, "telltale_mul_scale": 0.5})
    assert salt(suppress, seed=1) != salt(suppress, seed=2)
    assert salt({"telltale_method": "loop", **fixed}) != salt(suppress)
    # an adaptive tau depends on all traffic so far: never shared
    adaptive = {"telltale_method": "ttts"}
    assert salt(adaptive) != salt(adaptive, request_id="r2")
