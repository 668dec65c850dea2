"""The families people reason with, as tiny random checkpoints in the real vLLM CPU engine
(eager): gpt-oss (attention sinks, sliding window, MoE), Qwen3-MoE, DeepSeek-V2 (MLA + MoE,
`llama_4_scaling` passed to every layer) and Qwen3-Next (gated delta-net linear attention
mixed with full attention).

Per family: a plain vLLM engine (no VLLM_PATCH) gives the reference tokens; then one engine
with VLLM_PATCH=monitor on layers 1,2 (adaptive tau still warming up: the default changes
nothing) runs every method through per-request settings: off and monitor equal plain vLLM,
monitor counts every decode token, suppress with tau 0 changes the output and tau 1e30 does
not, a forced loop re-runs every decode token where loop is allowed and a huge tau equals
off; a re-run gets every argument of the first pass; ttts injects (and with P_INJECT 0
changes nothing); rerank scores each request without changing it. Qwen3-Next's layer 2 is a linear-
attention layer: a loop request on it fails alone, and VLLM_PATCH=loop on it stops the
engine at start.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

import telltale_norm
import worker_probes
from telltale_norm import rerank
from conftest import PROMPTS, greedy, token_ids, vllm_engine
from processes import clean_env, finish, start_script

pytestmark = pytest.mark.engine  # every test here starts a vLLM engine

MAX_TOKENS = 12
DECODE_TOKENS = len(PROMPTS) * (MAX_TOKENS - 1)  # the first token is sampled by the prefill
LAYERS = (1, 2)
IN_PROCESS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # engine core in this process: faster


@dataclass(frozen=True)
class Family:
    vllm_class: str
    dtype: str
    loop_layers: tuple[int, ...]  # patched layers that loop may re-run


FAMILIES = {
    "gpt_oss": Family("GptOssForCausalLM", "float32", (1, 2)),
    "qwen3_moe": Family("Qwen3MoeForCausalLM", "float32", (1, 2)),
    "deepseek_v2": Family("DeepseekV2ForCausalLM", "float32", (1, 2)),
    # layer_types: linear_attention on even layers, full_attention on odd ones
    "qwen3_next": Family("Qwen3NextForCausalLM", "bfloat16", (1,)),
}


def taus(value: float, layers=LAYERS) -> str:
    return json.dumps({str(layer): value for layer in layers})


# SPEC.md: the window is (tau, BLOWUP * tau); a small positive tau, a huge BLOWUP and a very
# negative GROWTH_EPS put every decode token in it.
def forced_loop(layer: int) -> dict:
    return dict(telltale_method="loop", telltale_layers=str(layer),
                telltale_tau_json=taus(1e-3, [layer]), telltale_blowup=1e12,
                telltale_growth_eps=-1e9)


def run(llm, **extra):
    telltale_norm.reset_stats(llm)
    tokens = token_ids(llm.generate(PROMPTS, greedy(MAX_TOKENS, **extra), use_tqdm=False))
    return tokens, telltale_norm.stats(llm)


def counts(stats, key) -> dict[int, int]:
    return {int(layer): entry[key] for layer, entry in stats["per_layer"].items()}


def each(value, layers=LAYERS) -> dict[int, int]:
    return {layer: value if layer in layers else 0 for layer in LAYERS}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tiny_model):
    """(arch, Family, patched engine, plain vLLM's tokens)."""
    arch = request.param
    spec, model = FAMILIES[arch], tiny_model(arch)
    with vllm_engine(model, IN_PROCESS, dtype=spec.dtype) as plain:
        assert plain.llm_engine.vllm_config.additional_config.get("telltale_norm") is None
        plain_tokens = token_ids(plain.generate(PROMPTS, greedy(MAX_TOKENS), use_tqdm=False))
    env = {"VLLM_PATCH": "monitor", "PATCHED_LAYERS": "1,2", "TELLTALE_ALLOW_LOOP": "1",
           **IN_PROCESS, "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}
    with vllm_engine(model, env, dtype=spec.dtype) as llm:
        yield arch, spec, llm, plain_tokens


def test_off_and_monitor_equal_plain_vllm(family):
    arch, spec, llm, plain = family
    assert llm.llm_engine.vllm_config.model_config.hf_config.architectures == [spec.vllm_class]
    assert len(set(map(tuple, plain))) > 1, "prompts should give different tokens"

    off, stats = run(llm, telltale_method="off")
    assert off == plain
    assert counts(stats, "tokens") == each(0)

    monitored, stats = run(llm)
    assert monitored == plain
    assert counts(stats, "tokens") == each(DECODE_TOKENS)
    assert counts(stats, "suppressed") == each(0)
    assert all(entry["median"] > 0 for entry in stats["per_layer"].values())


def test_suppress_acts_exactly_on_the_tokens_above_tau(family):
    arch, spec, llm, plain = family
    suppressed, stats = run(llm, telltale_method="suppress", telltale_tau_json=taus(0))
    assert suppressed != plain
    assert counts(stats, "suppressed") == each(DECODE_TOKENS)

    huge, stats = run(llm, telltale_method="suppress", telltale_tau_json=taus(1e30))
    assert huge == plain
    assert counts(stats, "suppressed") == each(0)


@pytest.mark.parametrize("layer", LAYERS)
def test_loop_reruns_where_allowed_and_is_refused_elsewhere(family, layer):
    arch, spec, llm, plain = family
    if layer not in spec.loop_layers:
        with pytest.raises(ValueError, match=rf"telltale_method=loop cannot re-run layers "
                                             rf"\[{layer}\].*linear_attention.*recurrent state"
                                             rf".*Layers that may loop: \[1, 3\]"):
            llm.generate(PROMPTS[:1], greedy(MAX_TOKENS, **forced_loop(layer)))
        assert run(llm, telltale_method="off")[0] == plain  # the engine is unaffected
        return
    looped, stats = run(llm, **forced_loop(layer))
    assert looped != plain
    assert counts(stats, "reruns") == each(DECODE_TOKENS, [layer])
    assert counts(stats, "rerun_taken") == each(DECODE_TOKENS, [layer])

    huge, stats = run(llm, **{**forced_loop(layer), "telltale_tau_json": taus(1e30, [layer])})
    assert huge == plain
    assert counts(stats, "tokens") == each(DECODE_TOKENS, [layer])  # loop did look
    assert counts(stats, "reruns") == each(0)


def test_ttts_injects_and_rerank_scores(family):
    arch, spec, llm, plain = family
    _, stats = run(llm)  # monitor: tau at each layer's median norm, half the tokens above
    tau = json.dumps({layer: entry["median"] for layer, entry in stats["per_layer"].items()})
    # every token counts as low (GAMMA huge); every trigger injects once the bank has states
    ttts = dict(telltale_method="ttts", telltale_tau_json=tau, telltale_low_k=2,
                telltale_gamma=1e6, telltale_cos_min=-1, telltale_cooldown=3)
    injected, stats = run(llm, **ttts, telltale_p_inject=1)
    assert injected != plain
    assert all(n > 0 for n in counts(stats, "injections").values()), stats["per_layer"]
    unchanged, stats = run(llm, **ttts, telltale_p_inject=0)
    assert unchanged == plain and counts(stats, "injections") == each(0)

    outputs = llm.generate(PROMPTS, greedy(MAX_TOKENS, telltale_method="rerank",
                                           telltale_tau_json=tau), use_tqdm=False)
    assert token_ids(outputs) == plain
    # Finish notices reach the worker with the next step, which an in-process engine core
    # takes only for a new request.
    llm.generate(PROMPTS[:1], greedy(1, telltale_method="off"), use_tqdm=False)
    for selection in rerank.select(llm, outputs):
        assert selection.index == 0 and selection.metric == "mean"
        assert selection.scores[0]["score"] > 0 and selection.scores[0]["C"] > 0


def test_a_rerun_gets_every_argument_of_the_first_pass(family):
    arch, spec, llm, plain = family
    llm.collective_rpc(worker_probes.record_calls, args=(1,))
    try:
        run(llm, **forced_loop(1))
    finally:
        report = llm.collective_rpc(worker_probes.call_report, args=(1,))[0]
    steps = MAX_TOKENS - 1  # decode steps; each re-runs layer 1 once
    assert report["reruns"] == steps and report["first_passes"] == steps + 1, report
    assert report["mismatches"] == [], report
    if arch == "deepseek_v2":  # a tensor argument, different per position
        assert report["extras"] == {"llama_4_scaling": "Tensor"}, report
        assert report["llama_4_error"] < 1e-6 and report["llama_4_values"] > 1, report


def test_reruns_write_no_kv_cache(family):
    """Layer 1's K/V writes during a forced loop: each scheduled token's slot exactly once
    (MLA too: it writes through the slot mapping, which a re-run hides). Re-runs that leave
    the slot mapping in place write more: the check can fail."""
    arch, spec, llm, plain = family

    def written_slots():
        assert llm.collective_rpc(worker_probes.log_kv_writes, args=(1,))[0] == 1
        try:
            outputs = llm.generate(PROMPTS, greedy(MAX_TOKENS, **forced_loop(1)),
                                   use_tqdm=False)
        finally:
            slots = llm.collective_rpc(worker_probes.take_kv_writes, args=(1,))[0]
        # prompt tokens not served from the prefix cache, then every decode token
        scheduled = sum(len(o.prompt_token_ids) - (o.num_cached_tokens or 0) + MAX_TOKENS - 1
                        for o in outputs)
        return slots, scheduled

    slots, scheduled = written_slots()
    assert len(slots) == len(set(slots)) == scheduled
    llm.collective_rpc(worker_probes.leaky_reruns, args=(True,))
    try:
        leaky, _ = written_slots()
    finally:
        llm.collective_rpc(worker_probes.leaky_reruns, args=(False,))
    assert len(leaky) >= scheduled + (MAX_TOKENS - 1) * len(PROMPTS)


# ---------------------------------------------------------------- VLLM_PATCH=loop at start
def test_loop_default_on_a_linear_attention_layer_stops_the_engine(tiny_model):
    env = clean_env(VLLM_PATCH="loop", PATCHED_LAYERS="1,2", **IN_PROCESS)
    rc, out, err = finish(start_script(tiny_model("qwen3_next"), env, max_tokens=2,
                                       dtype="bfloat16"))
    assert rc != 0
    assert ("telltale-norm: VLLM_PATCH=loop cannot re-run layers [2] of "
            "Qwen3NextForCausalLM: layer 2: holds recurrent state (QwenGatedDeltaNetAttention)"
            in out + err), (out + err)[-3000:]
    assert "Layers that may loop: [1, 3]. Set PATCHED_LAYERS" in out + err
    assert "TOKENS" not in out
