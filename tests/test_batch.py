"""A step's plan: a decode step of the last step's requests reuses the last plan
(`advance_plan`), and gives what `plan_step` computes from scratch."""

import dataclasses

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from telltale_norm.batch import StepBuffers, plan_step
from telltale_norm.config import TelltaleConfig
from telltale_norm.runtime import TelltaleRuntime

METHODS = ("monitor", "ttts", "suppress", "loop", "off")
PROMPT = 4
CACHED_PROMPT = 24  # a prompt found in the prefix cache but for its last token
TOKENS = 256  # the longest step: 3 requests recomputed after 25 steps


def make_runtime(capacity: int = 3) -> TelltaleRuntime:
    config = TelltaleConfig.from_env({"VLLM_PATCH": "monitor", "TELLTALE_ALLOW_LOOP": "1",
                                      "PATCHED_LAYERS": "1,2"})
    rt = TelltaleRuntime(config, num_layers=4, hidden_size=8, max_num_seqs=capacity,
                         max_num_tokens=TOKENS)
    # the step's buffers as CUDA writes them (through a staging tensor), fed the same plans
    rt.staged_buffers = StepBuffers(rt.states, rt.patched_layers, TOKENS, staged=True)
    return rt


def begin_and_check(rt: TelltaleRuntime, ids, scheduled, computed, prompts, methods) -> None:
    """`rt.begin_step`, checked against `plan_step` on the states as they were before it:
    the same plan, the same high-water marks and the same step buffers."""
    scheduled, computed = np.array(scheduled, dtype=np.int64), np.array(computed, np.int64)
    high_water, new = rt.states.high_water.copy(), [r for r in ids if r not in rt.states]
    rt.begin_step(ids, scheduled, computed, np.array([prompts[r] for r in ids]),
                  lambda rid: ({"telltale_method": methods[rid]}, None, 0))
    plan, after = rt._plan, rt.states.high_water.copy()
    rt.states.high_water[:] = high_water
    rt.states.high_water[[rt.states.slot(r) for r in new]] = -1  # as admission left it
    slots = np.array([rt.states.slot(r) for r in ids], dtype=np.int64)
    expected = plan_step(rt.states, slots, scheduled, computed)
    for field in dataclasses.fields(plan):
        got, want = getattr(plan, field.name), getattr(expected, field.name)
        assert np.array_equal(got, want), field.name
    assert np.array_equal(rt.states.high_water, after)
    buffers = StepBuffers(rt.states, rt.patched_layers, TOKENS)
    buffers.write(expected)
    rt.staged_buffers.write(plan)  # a reused plan: only the positions are copied
    for name in ("_packed", "_ints", "_floats"):  # the step's tokens and their settings
        for written in (rt.buffers, rt.staged_buffers):
            torch.testing.assert_close(getattr(written, name), getattr(buffers, name),
                                       rtol=0, atol=0, equal_nan=True, msg=name)
    rt.end_step()


# A step: each live request decodes its next token (0), decodes two (1: speculative
# decoding), is recomputed from its start after a preemption (2) or finishes (3); and
# maybe a new request is admitted (maybe with the id of a finished one), prefilling its
# prompt or, when most of a long prompt is cached, only the prompt's last token.
steps = st.lists(st.tuples(st.lists(st.sampled_from([0, 0, 0, 0, 1, 2, 3]), min_size=3,
                                    max_size=3),
                           st.sampled_from([None, *METHODS]), st.booleans()),
                 min_size=1, max_size=25)


@settings(max_examples=120, deadline=None)
@given(steps=steps)
def test_every_step_plan_equals_a_plan_from_scratch(steps):
    rt = make_runtime()
    live: dict[str, int] = {}  # request -> tokens computed
    methods: dict[str, str] = {}
    prompts: dict[str, int] = {}
    for actions, new, cached in steps:
        ids, scheduled, computed, done = [], [], [], []
        for (rid, length), action in zip(list(live.items()), actions):
            if action == 3:
                done.append(rid)
                continue
            start = 0 if action == 2 else length
            count = length + 1 if action == 2 else 1 + (action == 1)
            ids.append(rid), scheduled.append(count), computed.append(start)
            live[rid] = start + count
        for rid in done:
            del live[rid]
        rt.release(done)
        if new is not None and len(live) < 3:
            rid = next(f"r{i}" for i in range(4) if f"r{i}" not in live)  # ids come back
            methods[rid] = new
            prompts[rid] = live[rid] = CACHED_PROMPT if cached else PROMPT
            ids.append(rid), scheduled.append(1 if cached else PROMPT)
            computed.append(CACHED_PROMPT - 1 if cached else 0)
        if ids:
            begin_and_check(rt, ids, scheduled, computed, prompts, methods)


def test_a_decode_step_of_the_same_requests_reuses_the_last_plan():
    rt = make_runtime()
    methods, prompts = {"a": "ttts", "b": "monitor"}, {"a": PROMPT, "b": PROMPT}
    begin_and_check(rt, ["a", "b"], [PROMPT, PROMPT], [0, 0], prompts, methods)
    begin_and_check(rt, ["a", "b"], [1, 1], [PROMPT, PROMPT], prompts, methods)
    first = rt._last[1]
    begin_and_check(rt, ["a", "b"], [1, 1], [PROMPT + 1, PROMPT + 1], prompts, methods)
    assert rt._last[1].token_slot is first.token_slot  # reused, positions moved
    assert rt._last[1].position.tolist() == [PROMPT + 1] * 2
    begin_and_check(rt, ["b", "a"], [1, 1], [PROMPT + 2, PROMPT + 2], prompts,
                    methods)  # reordered
    assert rt._last[1].token_slot is not first.token_slot


def test_a_finished_request_whose_id_comes_back_is_planned_as_a_new_request():
    rt = make_runtime()
    methods, prompts = {"a": "monitor", "b": "monitor"}, {"a": PROMPT, "b": PROMPT}
    begin_and_check(rt, ["a", "b"], [PROMPT, PROMPT], [0, 0], prompts, methods)
    begin_and_check(rt, ["a", "b"], [1, 1], [PROMPT, PROMPT], prompts, methods)
    rt.release(["b"])
    # "b" again: a new request whose long prompt is cached but for its last token, so the
    # step looks like the last one (the same ids, one token each, positions past the marks)
    methods["b"], prompts["b"] = "ttts", CACHED_PROMPT
    begin_and_check(rt, ["a", "b"], [1, 1], [PROMPT + 1, CACHED_PROMPT - 1], prompts, methods)
    assert rt._last[1].ttts_rows.tolist() == []  # its prompt token: not a ttts decode token
    begin_and_check(rt, ["a", "b"], [1, 1], [PROMPT + 2, CACHED_PROMPT], prompts, methods)
    assert rt._last[1].ttts_rows.tolist() == [1]
