"""ttts (ERSS) inside a real vLLM CPU engine (tiny Llama, eager, one engine for the module):
a seeded request injects the same way alone and in a crowd, no-op settings are plain vLLM,
injections happen exactly where SPEC.md's rules put them on the recorded norm trace, and no
bank outlives its request (aborts included)."""

from __future__ import annotations

import json
import random
import time

import numpy as np
import pytest
import torch
from vllm import SamplingParams

import telltale_norm
from conftest import PROMPTS, greedy, run_staggered, token_ids, vllm_engine, wait_traces
from telltale_norm import rng

MAX_TOKENS = 24
STEPS = MAX_TOKENS - 1  # decode steps: the first token is sampled from the prefill
LAYERS = (1, 2)
# Near the median decode norm of each layer of the tiny model (layer 1: ~6-10, layer 2:
# ~8-12.5), so some tokens are above tau (they fill the bank) and some below.
TAU = {1: 7.6, 2: 10.3}
TAU_JSON = json.dumps({str(k): v for k, v in TAU.items()})
TAU_HUGE = json.dumps({"1": 1e30, "2": 1e30})
OFF = dict(telltale_method="off")
# Every token is "low" (GAMMA * tau is huge) while tokens above tau still fill the bank; every
# trigger draws (P_INJECT = 1) and matches (COS_MIN = -1) once the bank holds a state.
FORCE = dict(telltale_method="ttts", telltale_tau_json=TAU_JSON, telltale_low_k=2,
             telltale_gamma=1e6, telltale_p_inject=1, telltale_cos_min=-1,
             telltale_cooldown=3, telltale_beta=0.5)
# Realistic streaks (GAMMA = 1: they reset above tau) and a coin flip per trigger.
HALF = dict(telltale_method="ttts", telltale_tau_json=TAU_JSON, telltale_low_k=2,
            telltale_gamma=1.0, telltale_p_inject=0.5, telltale_cos_min=-1,
            telltale_cooldown=1, telltale_beta=0.5)


@pytest.fixture(scope="module")
def llm(tiny_model):
    """One engine for every per-request setting of this module."""
    with vllm_engine(tiny_model("llama"), {"VLLM_PATCH": "monitor", "PATCHED_LAYERS": "1,2"},
                     kv_cache_memory_bytes=128 * 2**20) as engine:
        yield engine


@pytest.fixture(scope="module")
def off_tokens(llm):
    """Greedy tokens of the baseline: the same engine, `telltale_method=off`."""
    return token_ids(llm.generate(PROMPTS, greedy(MAX_TOKENS, **OFF), use_tqdm=False))


def sampled(max_tokens, seed, n=1, **extra):
    return SamplingParams(max_tokens=max_tokens, temperature=0.9, seed=seed, n=n,
                          ignore_eos=True, extra_args=extra or None)


def per_layer(stats, key):
    return {int(layer): entry[key] for layer, entry in stats["per_layer"].items()}


def run(llm, prompts, params):
    telltale_norm.reset_stats(llm)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return outputs, telltale_norm.stats(llm)


# ---------------------------------------------------------------- the rules, from SPEC.md
def replay(norm, tau, draws, low_k, gamma, p_inject, cooldown):
    """SPEC.md "ttts" on one request's trace of one layer, with COS_MIN = -1 (any bank state
    matches). Returns per-step injection flags, triggers that found an empty bank, and
    triggers declined by the draw."""
    gamma, p_inject = np.float32(gamma), np.float32(p_inject)
    banked, streak, cd = 0, 0, 0
    flags, no_match, declined = [], 0, 0
    for n, t, u in zip(norm, tau, draws):
        cd = max(cd - 1, 0)
        if n > t:
            banked += 1
        streak = streak + 1 if n < gamma * t else 0
        injected = False
        if streak >= low_k and cd == 0:
            if u >= p_inject:
                declined += 1
            elif banked == 0:
                no_match += 1
            else:
                injected, streak, cd = True, 0, cooldown
        flags.append(injected)
    return flags, no_match, declined


def ttts_draws(seed, layer, start, steps):
    """The seeded uniform draws of decode steps 0..steps-1 (absolute positions from start)."""
    position = torch.arange(start, start + steps)
    return rng.uniform(torch.full_like(position, seed), rng.STREAM_TTTS, layer,
                       position).numpy()


def predicted(trace, settings, seed, prompt_len):
    """Per layer: (flags, no_match, declined) the rules predict for a recorded trace."""
    out = {}
    for col, layer in enumerate(trace.layers):
        steps = trace.norm.shape[0]
        out[layer] = replay(trace.norm[:, col], trace.tau[:, col],
                            ttts_draws(seed, layer, prompt_len, steps),
                            settings["telltale_low_k"], settings["telltale_gamma"],
                            settings["telltale_p_inject"], settings["telltale_cooldown"])
    return out


# ---------------------------------------------------------------- 1: no-op settings
def test_p_inject_zero_is_the_baseline(llm, off_tokens):
    outputs, stats = run(llm, PROMPTS, greedy(MAX_TOKENS, **{**FORCE, "telltale_p_inject": 0}))
    assert token_ids(outputs) == off_tokens
    assert per_layer(stats, "injections") == {1: 0, 2: 0}
    assert per_layer(stats, "inject_no_match") == {1: 0, 2: 0}
    assert per_layer(stats, "tokens") == {1: len(PROMPTS) * STEPS, 2: len(PROMPTS) * STEPS}


def test_huge_tau_is_the_baseline(llm, off_tokens):
    # Every token is low, so triggers fire, but no state ever enters the bank.
    outputs, stats = run(llm, PROMPTS, greedy(MAX_TOKENS, **{**FORCE,
                                                             "telltale_tau_json": TAU_HUGE}))
    assert token_ids(outputs) == off_tokens
    assert per_layer(stats, "injections") == {1: 0, 2: 0}
    assert all(v > 0 for v in per_layer(stats, "inject_no_match").values())
    assert per_layer(stats, "max_low_streak") == {1: STEPS, 2: STEPS}


def test_p_inject_zero_with_seeded_sampling_is_the_baseline(llm):
    params = [sampled(MAX_TOKENS, 100 + i) for i in range(len(PROMPTS))]
    base = token_ids(llm.generate(PROMPTS, [p.clone() for p in params], use_tqdm=False))
    for p in params:
        p.extra_args = {**FORCE, "telltale_p_inject": 0}
    outputs, stats = run(llm, PROMPTS, params)
    assert token_ids(outputs) == base
    assert per_layer(stats, "injections") == {1: 0, 2: 0}


# ---------------------------------------------------------------- 2: the rules, exactly
@pytest.mark.parametrize("settings", [FORCE, {**FORCE, "telltale_bank_k": 1}],
                         ids=["bank32", "bank1"])
def test_forced_injections_are_exactly_those_the_rules_predict(llm, off_tokens, settings):
    outputs, stats = run(llm, PROMPTS, greedy(MAX_TOKENS, **settings, telltale_trace=1))
    traces = wait_traces(llm, [(o.request_id, 0) for o in outputs])
    total = {layer: 0 for layer in LAYERS}
    no_match = {layer: 0 for layer in LAYERS}
    for out in outputs:
        trace = traces[(out.request_id, 0)]
        assert trace.layers == LAYERS
        assert trace.norm.shape == (STEPS, len(LAYERS))
        np.testing.assert_array_equal(trace.tau, np.float32([[TAU[1], TAU[2]]] * STEPS))
        assert (trace.norm > 0).all()
        # greedy and unseeded: the draws use the default seed 1234 (irrelevant at P = 1)
        rules = predicted(trace, settings, 1234, len(out.prompt_token_ids))
        for col, layer in enumerate(LAYERS):
            flags, misses, _ = rules[layer]
            got = ((trace.action[:, col] & 4) != 0).tolist()
            assert got == flags, (out.request_id, layer)
            total[layer] += sum(flags)
            no_match[layer] += misses
    assert per_layer(stats, "injections") == total
    assert per_layer(stats, "inject_no_match") == no_match
    assert all(count >= len(PROMPTS) for count in total.values())
    assert token_ids(outputs) != off_tokens


def test_half_chance_injections_follow_the_seeded_draws(llm, off_tokens):
    """P_INJECT = 0.5: which triggers inject is decided by the counter-based draws, seeded
    by SamplingParams.seed when set, else by telltale_random_seed."""
    params = [greedy(MAX_TOKENS, **HALF, telltale_trace=1, telltale_random_seed=77)
              if i % 2 == 0 else sampled(MAX_TOKENS, 5 + i, **HALF, telltale_trace=1,
                                         telltale_random_seed=77)
              for i in range(len(PROMPTS))]
    seeds = [77 if i % 2 == 0 else 5 + i for i in range(len(PROMPTS))]
    outputs, stats = run(llm, PROMPTS, params)
    traces = wait_traces(llm, [(o.request_id, 0) for o in outputs])
    total = {layer: 0 for layer in LAYERS}
    declined = 0
    for out, seed in zip(outputs, seeds):
        trace = traces[(out.request_id, 0)]
        rules = predicted(trace, HALF, seed, len(out.prompt_token_ids))
        for col, layer in enumerate(LAYERS):
            flags, _, no = rules[layer]
            assert ((trace.action[:, col] & 4) != 0).tolist() == flags, (out.request_id, layer)
            total[layer] += sum(flags)
            declined += no
    assert per_layer(stats, "injections") == total
    assert sum(total.values()) > 0 and declined > 0  # the draws decided something
    assert token_ids(outputs)[0::2] != off_tokens[0::2]


def test_candidates_of_one_prompt_draw_from_their_own_seeds(llm):
    """n > 1: candidate i draws with seed + i, the seed being SamplingParams.seed when set,
    else telltale_random_seed."""
    seeded = sampled(MAX_TOKENS, 5, n=3, **HALF, telltale_trace=1)
    unseeded = SamplingParams(n=3, temperature=0.9, max_tokens=MAX_TOKENS, ignore_eos=True,
                              extra_args={**HALF, "telltale_trace": 1,
                                          "telltale_random_seed": 77})
    outputs, _ = run(llm, PROMPTS[1:3], [seeded, unseeded])
    traces = wait_traces(llm, [(o.request_id, c.index) for o in outputs for c in o.outputs])
    for out, base in zip(outputs, (5, 77)):
        for cand in out.outputs:
            trace = traces[(out.request_id, cand.index)]
            rules = predicted(trace, HALF, base + cand.index, len(out.prompt_token_ids))
            for col, layer in enumerate(LAYERS):
                got = ((trace.action[:, col] & 4) != 0).tolist()
                assert got == rules[layer][0], (base, cand.index, layer)


def test_bank_k_above_the_server_limit_is_rejected(llm):
    with pytest.raises(ValueError, match=r"telltale_bank_k=33"):
        llm.generate(PROMPTS[:1], greedy(4, **FORCE, telltale_bank_k=33), use_tqdm=False)


# ---------------------------------------------------------------- 3: continuous batching
# Two ttts requests with injections, each on its own layer, so the per-layer counters
# attribute injections to requests; a third ttts request fills banks but never injects.
TARGET = dict(telltale_method="ttts", telltale_layers="1", telltale_tau_json='{"1": 7.6}',
              telltale_low_k=2, telltale_gamma=1.05, telltale_p_inject=0.5,
              telltale_cooldown=2, telltale_cos_min=0.0)
OTHER = dict(telltale_method="ttts", telltale_layers="2", telltale_tau_json='{"2": 8.5}',
             telltale_low_k=1, telltale_gamma=1.0, telltale_p_inject=0.7,
             telltale_cooldown=1, telltale_cos_min=-1, telltale_bank_k=4)
QUIET = {**FORCE, "telltale_p_inject": 0}


def injections_of(llm, requests):
    telltale_norm.reset_stats(llm)
    done, _ = run_staggered(llm, requests)
    tokens = {rid: [list(c.token_ids) for c in out.outputs] for rid, out in done.items()}
    return tokens, per_layer(telltale_norm.stats(llm), "injections")


def test_a_seeded_request_injects_the_same_alone_and_among_others(llm):
    target = (PROMPTS[1], sampled(30, 11, **TARGET))
    other = (PROMPTS[3], sampled(25, 12, **OTHER))
    alone_target, count_target = injections_of(llm, [(0, "target", *target)])
    alone_other, count_other = injections_of(llm, [(0, "other", *other)])
    assert count_target[1] > 0 and count_target[2] == 0
    assert count_other[2] > 0 and count_other[1] == 0
    late = (PROMPTS[2], sampled(10, 5, **FORCE))  # both layers, and it injects
    alone_late, count_late = injections_of(llm, [(0, "late", *late)])
    crowd, count = injections_of(llm, [
        (0, "early", PROMPTS[0], sampled(8, 1, telltale_method="suppress",
                                         telltale_suppress_mode="random",
                                         telltale_random_suppress_p=0.3,
                                         telltale_tau_json=TAU_HUGE)),
        (0, "long", PROMPTS[2], sampled(40, 2, **OFF)),
        (0, "quiet", PROMPTS[3], sampled(20, 6, **QUIET)),
        (3, "target", *target),
        (5, "other", *other),
        (9, "later", PROMPTS[0] * 3, sampled(5, 4)),
        (12, "quiet2", PROMPTS[1], sampled(12, 7, n=2, **QUIET)),
        (14, "late", *late),
    ])
    assert crowd["target"] == alone_target["target"]
    assert crowd["other"] == alone_other["other"]
    assert crowd["late"] == alone_late["late"]
    assert count == {1: count_target[1] + count_late[1], 2: count_other[2] + count_late[2]}


# ---------------------------------------------------------------- 4: no state left behind
def test_no_bank_state_outlives_its_request(llm):
    llm.generate(PROMPTS, greedy(4, **FORCE), use_tqdm=False)  # banks allocated
    before = telltale_norm.stats(llm)["bank_bytes"]
    assert before > 0
    rnd = random.Random(0)
    kinds = [FORCE, {**HALF, "telltale_trace": 1}, QUIET, TARGET, OTHER,
             dict(telltale_method="rerank", telltale_tau_json=TAU_JSON),
             dict(telltale_method="monitor"), OFF]
    requests, abort_after = [], {}
    for i in range(300):
        start = i // 3
        extra = kinds[0] if i % 2 else kinds[rnd.randrange(len(kinds))]
        params = sampled(rnd.randint(3, 28), i, n=2 if i % 11 == 0 else 1, **extra)
        rid = f"churn-{i}"
        requests.append((start, rid, rnd.choice(PROMPTS) * rnd.randint(1, 3), params))
        if i % 4 == 1 and params.max_tokens >= 6:  # abort a quarter while decoding
            abort_after[rid] = rnd.randint(2, params.max_tokens - 2)
    telltale_norm.reset_stats(llm)
    done, aborted = run_staggered(llm, requests, abort_after)
    assert len(done) + len(aborted) == len(requests)
    assert len(aborted) >= 40 and not set(aborted) & set(done)
    churn = telltale_norm.stats(llm)
    assert sum(per_layer(churn, "injections").values()) > 100
    llm.generate(PROMPTS[:1], greedy(1), use_tqdm=False)  # finish notices arrive next step
    deadline = time.monotonic() + 10  # (and this request's own in the step after it)
    while (stats := telltale_norm.stats(llm))["live_requests"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stats["live_requests"] == 0
    assert stats["live_banks"] == 0
    assert stats["bank_bytes"] == before  # slots were reused, the pool never grew
    assert len(telltale_norm.traces(llm)) > 0  # traced requests left traces
    assert telltale_norm.stats(llm)["traces_waiting"] == 0
