"""The plugin's device memory is taken once, at engine start (before vLLM sizes its KV cache),
for `max_num_seqs` requests: running at full concurrency with every stateful method does not
grow it, and its size is the documented bytes per slot (README, "Memory")."""

from __future__ import annotations

import pytest

import telltale_norm
from conftest import greedy, vllm_engine
from telltale_norm.runtime import COUNTERS
from telltale_norm.requests import PARAM_COLUMNS
from telltale_norm.thresholds import DEFAULT_BINS

pytestmark = pytest.mark.engine

SEQS, TOKENS, HIDDEN, LAYERS, NUM_LAYERS = 4, 256, 64, 2, 4
BANK_K, LOG = 8, 16
ENV = {"VLLM_PATCH": "monitor", "PATCHED_LAYERS": "1,2", "TTTS_BANK_K": str(BANK_K),
       "TTTS_REPLAY_LOG": str(LOG)}
FORCED_TTTS = dict(telltale_method="ttts", telltale_tau_json='{"1": 1e-3, "2": 1e-3}',
                   telltale_gamma=1e30, telltale_low_k=1, telltale_p_inject=1.0,
                   telltale_cos_min=-1.0, telltale_cooldown=1)


def documented_bytes(dtype_bytes: int) -> dict[str, int]:
    """README's table: bytes per slot (and the null slot), per step token, and statistics."""
    slots = SEQS + 1
    per_slot_banks = (LAYERS * ((BANK_K + 1) * HIDDEN * dtype_bytes + BANK_K * 4 + 2 * 4)
                      + (LOG + 1) * (HIDDEN * dtype_bytes + 8) + 8)
    # step metadata (token slot, position, flags, ttts rows, their slots, token rows), the
    # token's settings (method, per layer: acts, random key; parameters, per layer: fixed
    # tau), the record, loop bits; per request, ttts's staging of the step's float32 states
    per_token = 6 * 8 + (1 + 2 * LAYERS) * 8 + (len(PARAM_COLUMNS) + LAYERS) * 4 + LAYERS * 4 * 4
    staging = SEQS * HIDDEN * 4
    # per layer: its histogram, sum, and the quartiles of the current step (float32 Q1, Q3)
    stats = NUM_LAYERS * (DEFAULT_BINS * 8 + 8 + 8) + len(COUNTERS) * NUM_LAYERS * 8
    # the settings tables live on the host: each step's tokens take theirs (per_token)
    return {"slot_bytes": 0, "bank_bytes": slots * per_slot_banks,
            "step_bytes": TOKENS * per_token + 1 + staging, "stats_bytes": stats}


def test_memory_is_allocated_at_start_and_does_not_grow_at_full_concurrency(tiny_model):
    with vllm_engine(tiny_model("llama"), ENV, max_num_seqs=SEQS,
                     max_num_batched_tokens=TOKENS) as llm:
        start = telltale_norm.stats(llm)
        assert start["slots"] == SEQS
        expected = documented_bytes(dtype_bytes=4)  # the tiny model runs in float32
        assert {k: start[k] for k in expected} == expected
        assert start["plugin_bytes"] == sum(expected.values())

        prompts = [f"Request {i} says" for i in range(3 * SEQS)]
        methods = [FORCED_TTTS, {"telltale_method": "rerank"},
                   {"telltale_method": "monitor", "telltale_trace": 1}]
        params = [greedy(24, **methods[i % 3]) for i in range(len(prompts))]
        llm.generate(prompts, params, use_tqdm=False)
        after = telltale_norm.stats(llm)
        assert sum(e["injections"] for e in after["per_layer"].values()) > 0
        assert {k: after[k] for k in expected} == expected  # nothing grew
        assert after["rejected_requests"] == 0 and after["trace_steps_dropped"] == 0
