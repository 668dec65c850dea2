"""loop (ALRR) inside a real vLLM CPU engine: re-runs happen exactly where and as often as the
rule says, never write the KV cache, start from copies of the layer's output, leave requests
without loop alone, run inside the compiled graph, and agree token for token and decision for
decision with an independent plain-PyTorch decoder (tests/reference_decoder.py; gpt-oss in
tests/test_reference_gpt_oss.py).

Worker-side checks go through `LLM.collective_rpc(callable)`: vLLM only ships a callable to
its engine process with VLLM_ALLOW_INSECURE_SERIALIZATION=1 (`v1/serial_utils.py`), and the
engine core is a *spawned* process, so the callables of this module are pickled by value.
"""

from __future__ import annotations

import json
import sys

import cloudpickle
import numpy as np
import pytest

import telltale_norm
from conftest import PROMPTS, greedy, token_ids, vllm_engine
from reference_checks import loop_matches_reference, suppress_matches_reference
from reference_decoder import ReferenceDecoder

# The engine core is spawned: ship this module's worker-side functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

MAX_TOKENS = 24
DECODE_TOKENS = len(PROMPTS) * (MAX_TOKENS - 1)  # the first token comes from the prefill
LAYERS = (1, 2)
TAU_HUGE = json.dumps({str(layer): 1e30 for layer in LAYERS})
TAU0 = json.dumps({str(layer): 0 for layer in LAYERS})
# SPEC.md: the window is (tau, BLOWUP * tau); a small positive tau, a huge BLOWUP and a very
# negative GROWTH_EPS put every decode token in it and keep it there.
FORCE = dict(telltale_method="loop", telltale_tau_json=json.dumps({"1": 1e-3, "2": 1e-3}),
             telltale_blowup=1e12, telltale_growth_eps=-1e9)
OFF = dict(telltale_method="off")
KV_BYTES = 128 * 2**20  # a tiny model needs little; an explicit size also skips the warm-up
ENGINE_ENV = {"VLLM_PATCH": "loop", "PATCHED_LAYERS": ",".join(map(str, LAYERS)),
              "PATCHED_TAU_JSON": TAU_HUGE, "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}
# No prefix caching: a later request must recompute its prompt's K/V, never reuse cached ones.
ENGINE_KWARGS = dict(enable_prefix_caching=False, kv_cache_memory_bytes=KV_BYTES)


# ---------------------------------------------------------------- inside the worker
# These run in the engine's worker process (`worker` is vLLM's worker wrapper).
def _w_layer(worker, index):
    return worker.model_runner.model.model.layers[index]


def _w_log_kv_writes(worker, indices):
    """Wrap each listed layer's `impl.do_kv_cache_update` to log the slots (>= 0) it writes."""
    for index in indices:
        impl = _w_layer(worker, index).self_attn.attn.impl
        original = type(impl).do_kv_cache_update.__get__(impl)
        log = []

        def logged(layer, key, value, kv_cache, slot_mapping, _original=original, _log=log):
            _log.append(slot_mapping[slot_mapping >= 0].clone())
            return _original(layer, key, value, kv_cache, slot_mapping)

        impl.do_kv_cache_update = logged
        impl._tl_log = log
    return True


def _w_take_kv_writes(worker, indices):
    """Per layer: the slots written per call since the last take."""
    out = {}
    for index in indices:
        log = _w_layer(worker, index).self_attn.attn.impl._tl_log
        out[index] = [s.tolist() for s in log]
        log.clear()
    return out


def _w_unlog_kv_writes(worker, indices):
    for index in indices:
        impl = _w_layer(worker, index).self_attn.attn.impl
        impl.__dict__.pop("do_kv_cache_update", None)
        impl.__dict__.pop("_tl_log", None)
    return True


def _w_read_kv(worker, index, slots):
    """K and V cached by layer `index` at `slots`: array [len(slots), 2, kv_heads, head_dim].

    Layout-agnostic: the backend's own `do_kv_cache_update` writes numbered marks into a
    scratch block, which tells where each (slot in block, head, dim) element lives."""
    import torch

    attn = _w_layer(worker, index).self_attn.attn
    impl, kv = attn.impl, attn.kv_cache
    blocks, heads, block_size, width = kv.shape
    dim = width // 2
    scratch = torch.zeros((1, heads, block_size, width), dtype=kv.dtype)
    marks = torch.arange(1, block_size * heads * dim + 1, dtype=kv.dtype)
    marks = marks.view(block_size, heads, dim)
    type(impl).do_kv_cache_update(impl, attn, marks, -marks, scratch,
                                  torch.arange(block_size, dtype=torch.int64))
    flat = scratch.flatten()
    where = {}
    for sign, name in ((1, "k"), (-1, "v")):
        at = ((flat * sign) > 0).nonzero().squeeze(1)
        assert at.numel() == marks.numel(), "probe did not map every K/V element"
        index_of = torch.empty(marks.numel(), dtype=torch.int64)
        index_of[(flat[at] * sign).long() - 1] = at
        where[name] = index_of.view(block_size, heads * dim)
    slots = torch.tensor(slots, dtype=torch.int64)
    rows = kv[slots // block_size].reshape(len(slots), -1)
    k = rows.gather(1, where["k"][slots % block_size]).view(-1, heads, dim)
    v = rows.gather(1, where["v"][slots % block_size]).view(-1, heads, dim)
    return torch.stack([k, v], dim=1).numpy()


def _w_rerun_writes_cache(worker, on):
    """Negative control: a re-run that does NOT hide its KV writes (the bug the design avoids)."""
    from telltale_norm.vllm_adapter import op, rerun

    if on:
        op.rerun_layer = rerun.call_layer  # the same call, slot mapping left in place
    else:
        op.rerun_layer = rerun.rerun_layer
    return True


def _w_inplace_norms(worker, on):
    """Make the RMSNorms of every decoder layer behave like vLLM's GPU fused add+RMSNorm:
    with a residual, write (normed, sum) into the input tensors and return those tensors."""
    count = 0
    for layer in worker.model_runner.model.model.layers:
        for name in ("input_layernorm", "post_attention_layernorm"):
            norm = getattr(layer, name)
            if not on:
                norm.__dict__.pop("forward", None)
                continue
            calls = norm.__dict__.setdefault("_tl_calls", [0])
            original = type(norm).forward.__get__(norm)

            def inplace(x, residual=None, _original=original, _calls=calls):
                out = _original(x, residual)
                if residual is None:
                    return out
                normed, summed = out
                x.copy_(normed)
                residual.copy_(summed)
                _calls[0] += 1
                return x, residual

            norm.forward = inplace
            count += 1
    return count


def _w_inplace_calls(worker):
    return sum(getattr(layer, name).__dict__.get("_tl_calls", [0])[0]
               for layer in worker.model_runner.model.model.layers
               for name in ("input_layernorm", "post_attention_layernorm"))


# ---------------------------------------------------------------- helpers
def rpc(llm, fn, *args):
    return llm.collective_rpc(fn, args=args)[0]


def run(llm, prompts=PROMPTS, max_tokens=MAX_TOKENS, **extra):
    telltale_norm.reset_stats(llm)
    outputs = llm.generate(prompts, greedy(max_tokens, **extra), use_tqdm=False)
    return token_ids(outputs), telltale_norm.stats(llm)


def per_layer(stats, key):
    return {int(layer): entry[key] for layer, entry in stats["per_layer"].items()
            if int(layer) in LAYERS}


def each_layer(value):
    return {layer: value for layer in LAYERS}


@pytest.fixture(scope="module")
def llm(tiny_model):
    """One eager tiny-Llama engine with loop as default (tau huge: nothing re-runs unless a
    request says so), no prefix caching, callables allowed in collective_rpc."""
    with vllm_engine(tiny_model("llama"), ENGINE_ENV, **ENGINE_KWARGS) as engine:
        yield engine


@pytest.fixture(scope="module")
def off_tokens(llm):
    return run(llm, **OFF)[0]


@pytest.fixture(scope="module")
def forced(llm):
    """Tokens and stats of the forcing settings with MAX_EXTRA 1, eager."""
    return run(llm, **FORCE, telltale_max_extra=1)


# ---------------------------------------------------------------- 1, 2: where and how often
def test_huge_tau_is_plain_output_and_never_reruns(llm, off_tokens):
    tokens, stats = run(llm, telltale_method="loop")  # the engine's default tau: 1e30
    assert tokens == off_tokens
    assert per_layer(stats, "tokens") == each_layer(DECODE_TOKENS)  # loop did look
    for key in ("reruns", "rerun_tokens", "rerun_layer_passes"):
        assert per_layer(stats, key) == each_layer(0), key


def test_forcing_reruns_every_decode_token_once_per_layer(forced, off_tokens):
    tokens, stats = forced
    assert tokens != off_tokens
    for key in ("reruns", "rerun_tokens", "rerun_taken"):
        assert per_layer(stats, key) == each_layer(DECODE_TOKENS), key
    for key in ("rerun_stopped_tau", "rerun_stopped_growth", "rerun_stopped_blowup"):
        assert per_layer(stats, key) == each_layer(0), key
    # one extra pass of the whole step per decode step (prefill-only steps have none)
    assert per_layer(stats, "rerun_layer_passes") == each_layer(stats["decode_steps"])


def test_forcing_with_max_extra_3_reruns_three_times(llm, forced):
    tokens, stats = run(llm, **FORCE, telltale_max_extra=3)
    assert tokens != forced[0]
    for key in ("reruns", "rerun_taken"):
        assert per_layer(stats, key) == each_layer(3 * DECODE_TOKENS), key
    assert per_layer(stats, "rerun_tokens") == each_layer(DECODE_TOKENS)
    assert per_layer(stats, "rerun_layer_passes") == each_layer(3 * stats["decode_steps"])


def test_tau_zero_never_reruns_because_the_window_is_empty(llm, off_tokens):
    # SPEC.md: active = (n > tau) & (n < BLOWUP * tau); with tau = 0 that is n > 0 & n < 0.
    tokens, stats = run(llm, **{**FORCE, "telltale_tau_json": TAU0}, telltale_max_extra=3)
    assert tokens == off_tokens
    assert per_layer(stats, "tokens") == each_layer(DECODE_TOKENS)
    assert per_layer(stats, "reruns") == each_layer(0)
    assert per_layer(stats, "rerun_tokens") == each_layer(0)


def test_forcing_trace_marks_every_decode_step_and_layer(llm, forced):
    outputs = llm.generate(PROMPTS, greedy(MAX_TOKENS, **FORCE, telltale_trace=1),
                           use_tqdm=False)
    assert token_ids(outputs) == forced[0]
    traces = {t.request_id: t for t in telltale_norm.traces(llm)}
    for out in outputs:
        trace = traces[out.request_id]
        assert trace.layers == LAYERS
        assert trace.action.shape == (MAX_TOKENS - 1, len(LAYERS))
        assert (trace.action & 2).all()
        np.testing.assert_allclose(trace.tau, 1e-3, rtol=1e-6)


# ---------------------------------------------------------------- 3: the KV cache
def test_reruns_write_no_kv_cache_rows(llm, forced):
    """Count the rows `do_kv_cache_update` writes for a patched layer: exactly the scheduled
    tokens, each slot once, although the layer ran many extra passes. The same count with a
    re-run that does not hide its writes shows the check can fail."""
    rpc(llm, _w_log_kv_writes, [1])
    try:
        telltale_norm.reset_stats(llm)
        outputs = llm.generate(PROMPTS, greedy(MAX_TOKENS, **FORCE), use_tqdm=False)
        stats = telltale_norm.stats(llm)
        writes = rpc(llm, _w_take_kv_writes, [1])[1]
        scheduled = sum(len(o.prompt_token_ids) + MAX_TOKENS - 1 for o in outputs)
        slots = [s for call in writes for s in call]
        assert token_ids(outputs) == forced[0]
        assert per_layer(stats, "rerun_layer_passes")[1] > 0
        assert per_layer(stats, "reruns")[1] == DECODE_TOKENS
        assert len(slots) == scheduled
        assert len(set(slots)) == scheduled

        rpc(llm, _w_rerun_writes_cache, True)
        try:
            telltale_norm.reset_stats(llm)
            llm.generate(PROMPTS, greedy(MAX_TOKENS, **FORCE), use_tqdm=False)
            passes = per_layer(telltale_norm.stats(llm), "rerun_layer_passes")[1]
        finally:
            rpc(llm, _w_rerun_writes_cache, False)
        leaky = [s for call in rpc(llm, _w_take_kv_writes, [1])[1] for s in call]
        assert len(leaky) >= scheduled + passes  # every extra pass wrote >= 1 row
    finally:
        rpc(llm, _w_unlog_kv_writes, [1])


def _cached_kv(llm, prompt, layers, **extra):
    """Generate from `prompt` (token ids), then read each layer's cached K/V of every position
    the request wrote, in position order. Returns (tokens, {layer: [positions, 2, H, D]}).
    Needs a single request per call and no prefix caching (slots in write order = positions)."""
    rpc(llm, _w_log_kv_writes, layers)
    try:
        out = llm.generate([{"prompt_token_ids": prompt}], greedy(extra.pop("max_tokens"),
                                                                   **extra), use_tqdm=False)
        writes = rpc(llm, _w_take_kv_writes, layers)
    finally:
        rpc(llm, _w_unlog_kv_writes, layers)
    # each written slot once, in the order of first writes (= position order)
    slots = {layer: list(dict.fromkeys(s for call in writes[layer] for s in call))
             for layer in layers}
    return (token_ids(out)[0],
            {layer: rpc(llm, _w_read_kv, layer, slots[layer]) for layer in layers})


def test_rerun_layer_cache_holds_first_pass_kv(llm):
    """With loop on layer 1 only, layer 1's first-pass K/V at any position depend only on the
    token ids (layers 0..1 are untouched below it). So the cache of a loop run must equal the
    cache of the same tokens pushed through with loop off (one prefill, fresh computation: no
    prefix caching), while layer 2 (fed the re-run's output) differs at decode positions."""
    prompt = llm.get_tokenizer()(PROMPTS[1])["input_ids"]
    n = 16
    settings = dict(FORCE, telltale_layers="1", telltale_tau_json='{"1": 1e-3}',
                    telltale_max_extra=2)
    looped, loop_kv = _cached_kv(llm, prompt, (0, 1, 2), max_tokens=n, **settings)
    replay = prompt + looped[:-1]
    _, off_kv = _cached_kv(llm, replay, (0, 1, 2), max_tokens=1, **OFF)
    positions = len(replay)
    for layer in (0, 1, 2):
        assert loop_kv[layer].shape[0] == off_kv[layer].shape[0] == positions
    for layer in (0, 1):
        np.testing.assert_allclose(loop_kv[layer], off_kv[layer], rtol=1e-4, atol=1e-5,
                                   err_msg=f"layer {layer}")
    np.testing.assert_allclose(loop_kv[2][:len(prompt)], off_kv[2][:len(prompt)],
                               rtol=1e-4, atol=1e-5)
    assert np.abs(loop_kv[2][len(prompt):] - off_kv[2][len(prompt):]).max() > 1e-2

    # Negative control: a re-run that writes the cache leaves layer 1's decode K/V different.
    rpc(llm, _w_rerun_writes_cache, True)
    try:
        leaky, leaky_kv = _cached_kv(llm, prompt, (1,), max_tokens=n, **settings)
    finally:
        rpc(llm, _w_rerun_writes_cache, False)
    _, truth = _cached_kv(llm, prompt + leaky[:-1], (1,), max_tokens=1, **OFF)
    assert np.abs(leaky_kv[1][len(prompt):] - truth[1][len(prompt):]).max() > 1e-2


# ---------------------------------------------------------------- 4: in-place norms
def test_reruns_start_from_copies_when_norms_are_in_place(llm, off_tokens):
    """On GPU the fused add+RMSNorm overwrites its inputs. Make the CPU norms do the same: the
    re-run gets copies, so loop's output is unchanged. ALPHA 0.5 makes the result depend on
    the pre-re-run state (with ALPHA 1 a clobbered state would be overwritten anyway)."""
    settings = dict(FORCE, telltale_alpha=0.5, telltale_max_extra=2)
    expected, _ = run(llm, **settings)
    assert expected != off_tokens
    assert rpc(llm, _w_inplace_norms, True) == 2 * 4
    try:
        plain, _ = run(llm, **OFF)
        got, stats = run(llm, **settings)
        assert rpc(llm, _w_inplace_calls) > 0
    finally:
        rpc(llm, _w_inplace_norms, False)
    assert plain == off_tokens  # in-place norms alone change nothing
    assert got == expected
    assert per_layer(stats, "reruns") == each_layer(2 * DECODE_TOKENS)


# ---------------------------------------------------------------- 6: mixed batch
def test_loop_and_off_requests_share_a_batch(llm, off_tokens, forced):
    params = [greedy(MAX_TOKENS, **(FORCE if i % 2 else OFF)) for i in range(len(PROMPTS))]
    telltale_norm.reset_stats(llm)
    tokens = token_ids(llm.generate(PROMPTS, params, use_tqdm=False))
    for i, got in enumerate(tokens):
        assert got == (forced[0][i] if i % 2 else off_tokens[i]), i
    stats = telltale_norm.stats(llm)
    assert per_layer(stats, "reruns") == each_layer(DECODE_TOKENS // 2)
    assert per_layer(stats, "tokens") == each_layer(DECODE_TOKENS // 2)


# ---------------------------------------------------------------- 5: reference decoder
def test_reference_decoder_matches_transformers(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    for arch in ("llama", "qwen2", "qwen3", "gpt_oss"):
        path = tiny_model(arch)
        ref = ReferenceDecoder(path)
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        prompt = [1, 504, 3575, 282, 4649, 314, 2800, 28, 253, 7]
        with torch.no_grad():
            want = hf(torch.tensor([prompt])).logits[0]
        torch.testing.assert_close(ref.forward_logits(prompt), want, atol=1e-4, rtol=0)
        steps = []
        gen = ref.generate(prompt, 8, step_logits=steps)  # loop off: cache path
        with torch.no_grad():
            want = hf(torch.tensor([prompt + gen.tokens[:-1]])).logits[0, len(prompt) - 1:]
        torch.testing.assert_close(torch.stack(steps), want, atol=1e-4, rtol=0)


def test_vllm_loop_matches_reference_llama(llm, tiny_model):
    loop_matches_reference(llm, tiny_model("llama"))


def test_vllm_suppress_matches_reference_llama(llm, tiny_model):
    suppress_matches_reference(llm, tiny_model("llama"), "mul")


@pytest.mark.engine
def test_vllm_loop_matches_reference_qwen3(tiny_model):
    with vllm_engine(tiny_model("qwen3"), ENGINE_ENV, **ENGINE_KWARGS) as engine:
        loop_matches_reference(engine, tiny_model("qwen3"))


# ---------------------------------------------------------------- 7: compiled engine
@pytest.mark.engine
def test_compiled_engine_reruns_at_run_time(tiny_model, forced):
    """Compiled (torch.compile traces the model once): the re-runs happen inside the opaque
    op on every step, so the counters equal eager's; the tokens too."""
    with vllm_engine(tiny_model("llama"), ENGINE_ENV, enforce_eager=False,
                     **ENGINE_KWARGS) as engine:
        from vllm.config import CompilationMode

        # on the CPU the model is compiled in DYNAMO_TRACE_ONCE mode (traced once)
        assert engine.llm_engine.vllm_config.compilation_config.mode != CompilationMode.NONE
        tokens, stats = run(engine, **FORCE, telltale_max_extra=1)
        _, stats3 = run(engine, **FORCE, telltale_max_extra=3)
    for key in ("reruns", "rerun_tokens", "rerun_taken"):
        assert per_layer(stats, key) == each_layer(DECODE_TOKENS), key
    assert per_layer(stats3, "reruns") == each_layer(3 * DECODE_TOKENS)
    assert per_layer(stats, "rerun_layer_passes") == each_layer(stats["decode_steps"])
    assert tokens == forced[0]
