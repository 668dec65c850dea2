"""The plugin across decoder-layer families in the real vLLM CPU engine (eager).

One engine per architecture (VLLM_PATCH=monitor on layers 1,2, adaptive tau still warming up,
so the engine default changes nothing); per-request settings switch methods:
off -> the baseline; monitor -> the same tokens, every decode token counted; suppress with
tau 0 -> other tokens, every decode token of each patched layer suppressed; tau 1e30 -> the
baseline. An architecture whose layers do not fit is refused at engine start.
"""

from __future__ import annotations

import json

import pytest

import telltale_norm
from conftest import PROMPTS, greedy, token_ids, vllm_engine
from processes import clean_env, finish, script_tokens, start_script
from scripts.make_opt import make_tiny_opt

pytestmark = pytest.mark.engine  # every test here starts a vLLM engine

MAX_TOKENS = 12
DECODE_TOKENS = len(PROMPTS) * (MAX_TOKENS - 1)  # the first token is sampled by the prefill
TAU0 = json.dumps({"1": 0, "2": 0})
TAU_HUGE = json.dumps({"1": 1e30, "2": 1e30})
# Llama is every other test module's model; Gemma3 loads like Gemma2 (tests/test_models.py).
FAMILIES = ("qwen2", "qwen3", "mistral", "gemma2", "phi3")
VLLM_CLASS = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
              "mistral": "MistralForCausalLM", "gemma2": "Gemma2ForCausalLM",
              "phi3": "Phi3ForCausalLM"}


@pytest.fixture(scope="module", params=FAMILIES)
def family_llm(request, tiny_model):
    arch = request.param
    # In-process engine core and worker: half the start-up time. The patches are the same
    # ones (entry-point loading in separate processes is tests/test_entrypoints.py's job).
    with vllm_engine(tiny_model(arch), {"VLLM_PATCH": "monitor", "PATCHED_LAYERS": "1,2",
                                        "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}) as llm:
        yield arch, llm


def run(llm, **extra):
    telltale_norm.reset_stats(llm)
    tokens = token_ids(llm.generate(PROMPTS, greedy(MAX_TOKENS, **extra), use_tqdm=False))
    stats = telltale_norm.stats(llm)
    return tokens, stats


def counts(stats, key):
    return {layer: entry[key] for layer, entry in stats["per_layer"].items()}


def test_family_methods(family_llm):
    arch, llm = family_llm
    config = llm.llm_engine.vllm_config.model_config.hf_config
    assert config.architectures == [VLLM_CLASS[arch]]

    baseline, stats = run(llm, telltale_method="off")
    assert counts(stats, "tokens") == {"1": 0, "2": 0}
    assert len(set(map(tuple, baseline))) > 1, "prompts should give different tokens"

    monitored, stats = run(llm)
    assert monitored == baseline
    assert counts(stats, "tokens") == {"1": DECODE_TOKENS, "2": DECODE_TOKENS}
    assert counts(stats, "suppressed") == {"1": 0, "2": 0}
    assert 0 < stats["per_layer"]["2"]["median"]

    suppressed, stats = run(llm, telltale_method="suppress", telltale_tau_json=TAU0)
    assert suppressed != baseline
    assert counts(stats, "suppressed") == {"1": DECODE_TOKENS, "2": DECODE_TOKENS}

    huge, stats = run(llm, telltale_method="suppress", telltale_tau_json=TAU_HUGE)
    assert huge == baseline
    assert counts(stats, "suppressed") == {"1": 0, "2": 0}


# ---------------------------------------------------------------- an architecture that does not fit
@pytest.fixture(scope="module")
def opt_runs(tmp_path_factory, default_model):
    """A tiny OPT run by a plain vLLM script with VLLM_PATCH=monitor and with it unset
    (both at once: each is one engine start)."""
    model = make_tiny_opt(tmp_path_factory.mktemp("tiny-opt"))
    procs = {"monitor": start_script(model, clean_env(VLLM_PATCH="monitor"), max_tokens=4),
             "unset": start_script(model, clean_env(), max_tokens=4)}
    return {name: finish(proc) for name, proc in procs.items()}


def test_unfit_architecture_is_refused_at_engine_start(opt_runs):
    rc, out, err = opt_runs["monitor"]
    assert rc != 0
    assert "telltale-norm cannot patch model architecture OPTForCausalLM" in out + err
    assert "Unset VLLM_PATCH" in out + err
    assert "TOKENS" not in out


def test_unfit_architecture_runs_without_the_patch(opt_runs):
    rc, out, err = opt_runs["unset"]
    assert rc == 0, err[-3000:]
    tokens = script_tokens(out)
    assert len(tokens) == len(PROMPTS) and all(len(t) == 4 for t in tokens)
