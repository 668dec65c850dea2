"""The plugin against the independent reference decoder (tests/reference_decoder.py), in a
real vLLM engine: loop (ALRR) and suppress must agree with it token for token, decision for
decision and count for count, on patched layers 1 and 2, with a tau in the middle of the
norms that a monitor run observed (so that some tokens are treated and others not)."""

from __future__ import annotations

import json

import numpy as np

import telltale_norm
from conftest import PROMPTS, greedy, wait_traces
from reference_decoder import LoopSettings, ReferenceDecoder, SuppressSettings

LAYERS = (1, 2)
DIFF_STEPS = 40
DIFF_PROMPTS = PROMPTS[:2]
DECODE = len(DIFF_PROMPTS) * (DIFF_STEPS - 1)
ACTION_SUPPRESS, ACTION_RERUN = 1, 2  # trace action bits (telltale_norm.traces)
LOOP_COUNTERS = ("reruns", "rerun_tokens", "rerun_taken", "rerun_stopped_tau",
                 "rerun_stopped_growth", "rerun_stopped_blowup")


def per_layer(stats, key):
    return {int(layer): entry[key] for layer, entry in stats["per_layer"].items()
            if int(layer) in LAYERS}


def middle_gap_tau(norms: np.ndarray) -> float:
    """A tau between the 35th and 65th percentile of `norms`, in the widest gap between two
    observed norms there (decisions far from tau survive float32 noise)."""
    values = np.sort(norms)
    lo, hi = int(0.35 * len(values)), int(0.65 * len(values))
    gaps = values[lo + 1:hi + 1] - values[lo:hi]
    k = lo + int(np.argmax(gaps))
    return float((values[k] + values[k + 1]) / 2)


def _traces(llm, outputs) -> dict:
    # Finish notices reach the worker with the next engine step, which an in-process engine
    # core only takes for a new request: one off request of one token is that step.
    llm.generate(PROMPTS[:1], greedy(1, telltale_method="off"), use_tqdm=False)
    found = wait_traces(llm, [(o.request_id, 0) for o in outputs])
    return {request_id: trace for (request_id, _), trace in found.items()}


def monitored_tau(llm) -> dict[int, float]:
    outputs = llm.generate(DIFF_PROMPTS, greedy(DIFF_STEPS, telltale_method="monitor",
                                                telltale_trace=1), use_tqdm=False)
    monitor = _traces(llm, outputs)
    norms = np.concatenate([monitor[o.request_id].norm for o in outputs])
    return {layer: middle_gap_tau(norms[:, i]) for i, layer in enumerate(LAYERS)}


def _traced_run(llm, **settings):
    telltale_norm.reset_stats(llm)
    outputs = llm.generate(DIFF_PROMPTS, greedy(DIFF_STEPS, telltale_trace=1, **settings),
                           use_tqdm=False)
    traces = _traces(llm, outputs)
    return outputs, traces, telltale_norm.stats(llm)


def _check_step(out, trace, gen, tau: dict[int, float]) -> None:
    """One request: tokens, norms and tau equal the reference's, decisions far from a
    rule's boundary (or float32 noise could flip them)."""
    cols = list(LAYERS)
    assert list(out.outputs[0].token_ids) == gen.tokens
    assert gen.margin[:, cols].min() > 1e-5, gen.margin[:, cols].min()
    np.testing.assert_allclose(trace.norm, gen.norm[:, cols], rtol=1e-4)
    np.testing.assert_allclose(trace.tau, np.broadcast_to(
        [tau[layer] for layer in LAYERS], trace.tau.shape), rtol=1e-6)


def loop_matches_reference(llm, model_dir) -> dict[str, np.ndarray]:
    ref = ReferenceDecoder(model_dir)
    tau = monitored_tau(llm)
    # On these models a re-run grows the norm by 20-80 %: BLOWUP 2 and GROWTH_EPS 0.3 let some
    # tokens keep one or two re-runs and stop others by either rule (none can stop by tau).
    loop = LoopSettings(tau=tau, max_extra=2, growth_eps=0.3, blowup=2.0, alpha=0.75)
    outputs, traces, stats = _traced_run(
        llm, telltale_method="loop", telltale_tau_json=json.dumps(tau),
        telltale_max_extra=loop.max_extra, telltale_growth_eps=loop.growth_eps,
        telltale_blowup=loop.blowup, telltale_alpha=loop.alpha)
    cols = list(LAYERS)
    totals = dict.fromkeys(LOOP_COUNTERS, 0)
    for out in outputs:
        gen = ref.generate(list(out.prompt_token_ids), DIFF_STEPS, loop)
        trace = traces[out.request_id]
        _check_step(out, trace, gen, tau)
        np.testing.assert_array_equal((trace.action & ACTION_RERUN) > 0, gen.taken[:, cols] > 0)
        totals["reruns"] += gen.runs[:, cols].sum(0)
        totals["rerun_tokens"] += gen.entered[:, cols].sum(0)
        totals["rerun_taken"] += gen.taken[:, cols].sum(0)
        for why in ("tau", "growth", "blowup"):
            totals[f"rerun_stopped_{why}"] += getattr(gen, f"stopped_{why}")[:, cols].sum(0)
    for key, value in totals.items():
        assert per_layer(stats, key) == dict(zip(LAYERS, value.tolist())), key
    # some but not all tokens kept a re-run; some ran a second one; both stopping rules fired
    assert all(0 < t < DECODE for t in totals["rerun_taken"]), totals
    assert (totals["reruns"] > totals["rerun_tokens"]).all(), totals
    assert totals["rerun_stopped_growth"].sum() > 0 and totals["rerun_stopped_blowup"].sum() > 0
    return totals


def suppress_matches_reference(llm, model_dir, action: str) -> np.ndarray:
    ref = ReferenceDecoder(model_dir)
    # A mild scale: at 0.1, suppressing layer 1 would push every layer-2 norm under its tau.
    settings = SuppressSettings(tau=monitored_tau(llm), action=action, mul_scale=0.8)
    outputs, traces, stats = _traced_run(
        llm, telltale_method="suppress", telltale_tau_json=json.dumps(settings.tau),
        telltale_suppress_action=action, telltale_suppress_mul_scale=settings.mul_scale)
    cols = list(LAYERS)
    total = 0
    for out in outputs:
        gen = ref.generate(list(out.prompt_token_ids), DIFF_STEPS, suppress=settings)
        trace = traces[out.request_id]
        _check_step(out, trace, gen, settings.tau)
        np.testing.assert_array_equal((trace.action & ACTION_SUPPRESS) > 0,
                                      gen.suppressed[:, cols])
        total += gen.suppressed[:, cols].sum(0)
    assert per_layer(stats, "suppressed") == dict(zip(LAYERS, total.tolist()))
    assert all(0 < t < DECODE for t in total), total  # some tokens suppressed, not all
    return total
