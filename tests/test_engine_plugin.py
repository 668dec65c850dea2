"""The plugin inside a real vLLM CPU engine (tiny Llama, eager): off is plain vLLM, monitor
changes nothing, suppress acts exactly where and as often as its rules say, per request."""

from __future__ import annotations

import json

import pytest
from vllm import SamplingParams

import telltale_norm
from conftest import PROMPTS, greedy, run_staggered, token_ids, vllm_engine

MAX_TOKENS = 24
DECODE_TOKENS = len(PROMPTS) * (MAX_TOKENS - 1)  # the first token is sampled by the prefill
LAYERS = "1,2"
TAU0 = json.dumps({"1": 0, "2": 0})
TAU_HUGE = json.dumps({"1": 1e30, "2": 1e30})


@pytest.fixture(scope="module")
def plain_tokens(tiny_model):
    """Greedy tokens of plain vLLM: our plugin is not loaded in the engine processes."""
    with vllm_engine(tiny_model("llama"), {"VLLM_PLUGINS": "none"}) as llm:
        yield token_ids(llm.generate(PROMPTS, greedy(MAX_TOKENS)))


@pytest.fixture(scope="module")
def llm(tiny_model, tmp_path_factory):
    """One patched engine for every per-request setting of this module."""
    stats = tmp_path_factory.mktemp("stats") / "stats.json"
    with vllm_engine(tiny_model("llama"), {"VLLM_PATCH": "monitor", "PATCHED_LAYERS": LAYERS,
                                           "VLLM_PATCH_STATS_PATH": str(stats)}) as engine:
        yield engine


def run(llm, prompts=PROMPTS, **extra):
    telltale_norm.reset_stats(llm)
    tokens = token_ids(llm.generate(prompts, greedy(MAX_TOKENS, **extra), use_tqdm=False))
    return tokens, telltale_norm.stats(llm)


def per_layer(stats, key):
    return {layer: entry[key] for layer, entry in stats["per_layer"].items()}


def test_plugin_installed_with_patch_unset_is_plain_vllm(tiny_model, plain_tokens):
    with vllm_engine(tiny_model("llama"), {}) as llm:
        assert token_ids(llm.generate(PROMPTS, greedy(MAX_TOKENS))) == plain_tokens
        assert telltale_norm.stats(llm) == {"method": "off"}


def test_per_request_off_is_plain_vllm(llm, plain_tokens):
    tokens, stats = run(llm, telltale_method="off")
    assert tokens == plain_tokens
    assert stats["decode_steps"] == 0 and per_layer(stats, "tokens") == {"1": 0, "2": 0}


def test_monitor_changes_nothing_and_counts_every_decode_token(llm, plain_tokens):
    tokens, stats = run(llm)
    assert tokens == plain_tokens
    assert per_layer(stats, "tokens") == {"1": DECODE_TOKENS, "2": DECODE_TOKENS}
    # every request decodes MAX_TOKENS - 1 steps; the scheduler may stagger their prefills
    assert MAX_TOKENS - 1 <= stats["decode_steps"] <= MAX_TOKENS
    layer = stats["per_layer"]["2"]
    assert 0 < layer["q1"] <= layer["median"] <= layer["q3"]
    assert layer["tau"] is None  # adaptive tau still warming up (500 steps)


def test_suppress_tau_zero_touches_every_decode_token_of_each_patched_layer(llm, plain_tokens):
    tokens, stats = run(llm, telltale_method="suppress", telltale_tau_json=TAU0)
    assert tokens != plain_tokens
    assert per_layer(stats, "suppressed") == {"1": DECODE_TOKENS, "2": DECODE_TOKENS}


def test_suppress_on_one_layer_only(llm, plain_tokens):
    tokens, stats = run(llm, telltale_method="suppress", telltale_layers="2",
                        telltale_tau_json='{"2": 0}')
    assert tokens != plain_tokens
    assert per_layer(stats, "suppressed") == {"1": 0, "2": DECODE_TOKENS}


def test_suppress_with_huge_tau_is_plain_vllm(llm, plain_tokens):
    tokens, stats = run(llm, telltale_method="suppress", telltale_tau_json=TAU_HUGE)
    assert tokens == plain_tokens
    assert per_layer(stats, "suppressed") == {"1": 0, "2": 0}


def test_suppress_clamp_changes_output(llm, plain_tokens):
    tokens, stats = run(llm, telltale_method="suppress", telltale_tau_json=TAU0,
                        telltale_suppress_action="clamp", telltale_suppress_clamp_div=1e9)
    assert tokens != plain_tokens
    assert per_layer(stats, "suppressed") == {"1": DECODE_TOKENS, "2": DECODE_TOKENS}


def expected_random_choices(llm, p, seed):
    """Tokens that random suppress must choose: one seeded draw per (layer, position)."""
    import torch

    from telltale_norm import rng

    total = {}
    for layer in (1, 2):
        total[str(layer)] = 0
        for prompt in PROMPTS:
            start = len(llm.get_tokenizer()(prompt)["input_ids"])
            position = torch.arange(start, start + MAX_TOKENS - 1)
            draws = rng.uniform(torch.full_like(position, seed), rng.STREAM_SUPPRESS, layer,
                                position)
            total[str(layer)] += int((draws < p).sum())
    return total


def test_random_suppress_is_seeded_and_independent_of_norms(llm, plain_tokens):
    settings = dict(telltale_method="suppress", telltale_suppress_mode="random",
                    telltale_random_suppress_p=0.3, telltale_tau_json=TAU_HUGE)
    first, stats1 = run(llm, **settings)
    again, stats2 = run(llm, **settings)
    _, stats3 = run(llm, **settings, telltale_random_seed=7)
    assert first == again and stats1["per_layer"] == stats2["per_layer"]
    assert first != plain_tokens
    assert per_layer(stats1, "suppressed") == expected_random_choices(llm, 0.3, 1234)
    assert per_layer(stats3, "suppressed") == expected_random_choices(llm, 0.3, 7)


def test_requests_with_different_methods_share_a_batch(llm, plain_tokens):
    params = [greedy(MAX_TOKENS, telltale_method="suppress", telltale_tau_json=TAU0)
              if i % 2 else greedy(MAX_TOKENS, telltale_method="off")
              for i in range(len(PROMPTS))]
    telltale_norm.reset_stats(llm)
    tokens = token_ids(llm.generate(PROMPTS, params, use_tqdm=False))
    for i, (got, plain) in enumerate(zip(tokens, plain_tokens)):
        assert (got == plain) == (i % 2 == 0), i
    suppressed = per_layer(telltale_norm.stats(llm), "suppressed")
    assert suppressed == {"1": DECODE_TOKENS // 2, "2": DECODE_TOKENS // 2}




def test_a_seeded_request_is_the_same_alone_and_among_others(llm):
    def sampled(max_tokens, seed, **extra):
        return SamplingParams(max_tokens=max_tokens, temperature=0.9, seed=seed,
                              ignore_eos=True, extra_args=extra)

    settings = dict(telltale_method="suppress", telltale_suppress_mode="random",
                    telltale_random_suppress_p=0.3, telltale_tau_json=TAU_HUGE)
    target = (PROMPTS[1], sampled(20, 11, **settings))
    alone, _ = run_staggered(llm, [(0, "target", *target)])
    crowd, _ = run_staggered(llm, [
        (0, "early", PROMPTS[0], sampled(8, 1, **settings)),
        (0, "long", PROMPTS[2], sampled(30, 2, telltale_method="off")),
        (3, "target", *target),
        (5, "late", PROMPTS[3], sampled(12, 3, **settings)),
        (9, "later", PROMPTS[0] * 3, sampled(5, 4, telltale_tau_json=TAU0,
                                             telltale_method="suppress")),
    ])
    assert token_ids([crowd["target"]]) == token_ids([alone["target"]])


def test_an_invalid_request_setting_fails_that_request_alone(llm, plain_tokens):
    with pytest.raises(ValueError, match=r"telltale_max_extra='many'.*integer"):
        llm.generate(PROMPTS[:1], greedy(MAX_TOKENS, telltale_max_extra="many"))
    with pytest.raises(ValueError, match=r"telltale_layers=.*outside the model"):
        llm.generate(PROMPTS[:1], greedy(MAX_TOKENS, telltale_layers="1,9"))
    with pytest.raises(ValueError, match=r"unknown request setting telltale_nope"):
        llm.generate(PROMPTS[:1], greedy(MAX_TOKENS, telltale_nope=1))
    with pytest.raises(ValueError, match=r"telltale_layers=3: layers \[3\] are not patched"):
        llm.generate(PROMPTS[:1], greedy(MAX_TOKENS, telltale_method="suppress",
                                         telltale_layers="3"))
    # loop needs Python at its layers: only engines that allow it take loop requests
    with pytest.raises(ValueError, match=r"telltale_method=loop: this engine was started with "
                                         r"VLLM_PATCH=monitor.*VLLM_PATCH=loop.*"
                                         r"TELLTALE_ALLOW_LOOP=1"):
        llm.generate(PROMPTS[:1], greedy(MAX_TOKENS, telltale_method="loop"))
    tokens, _ = run(llm, telltale_method="off")  # the engine is unaffected
    assert tokens == plain_tokens


def test_live_request_states_are_freed(llm):
    run(llm, telltale_method="suppress", telltale_tau_json=TAU0)
    llm.generate(PROMPTS[:1], greedy(1), use_tqdm=False)  # finish notices arrive next step
    assert telltale_norm.stats(llm)["live_requests"] == 0


def test_stats_dump_writes_json(llm, tmp_path):
    run(llm, telltale_method="suppress", telltale_tau_json=TAU0)
    path = llm.collective_rpc("telltale_dump_stats", args=(str(tmp_path / "s.json"),))[0]
    dumped = json.loads(open(path).read())
    assert dumped["per_layer"]["1"]["suppressed"] == DECODE_TOKENS
    path = llm.collective_rpc("telltale_dump_stats", args=(str(tmp_path / "s.jsonl"),))[0]
    llm.collective_rpc("telltale_dump_stats", args=(str(tmp_path / "s.jsonl"),))
    lines = open(path).read().splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["method"] == "monitor"
