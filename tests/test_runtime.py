"""The per-worker runtime on plain tensors: token -> request mapping, decode detection,
per-request settings, warm-up and bookkeeping (no vLLM involved)."""

import numpy as np
import pytest
import torch

from telltale_norm import rng
from telltale_norm.config import TelltaleConfig
from telltale_norm.runtime import TelltaleRuntime

H = 8


def make_runtime(capacity=8, **env):
    env = {"VLLM_PATCH": "suppress", "PATCHED_LAYERS": "1,2", **env}
    return TelltaleRuntime(TelltaleConfig.from_env(env), num_layers=4, hidden_size=H,
                           max_num_seqs=capacity)


def run_step(rt, reqs, extra=None, layer=1, pad=0):
    """reqs: list of (req_id, num_scheduled, num_computed, num_prompt)."""
    extra = extra or {}
    ids = [r[0] for r in reqs]
    rt.begin_step(ids, np.array([r[1] for r in reqs]), np.array([r[2] for r in reqs]),
                  np.array([r[3] for r in reqs]), lambda rid: (extra.get(rid), None, 0))
    t = sum(r[1] for r in reqs) + pad
    hidden = torch.ones(t, H)
    residual = torch.ones(t, H)
    rt.on_layer(layer, hidden, residual)
    rt.end_step()
    return hidden


TAU0 = {"telltale_tau_json": '{"1": 0, "2": 0}'}


def test_decode_tokens_are_told_apart_per_request_in_a_mixed_step():
    rt = make_runtime()
    # "a" decodes one token (position 10, prompt 5); "b" prefills a chunk of its prompt.
    hidden = run_step(rt, [("a", 1, 10, 5), ("b", 8, 0, 20)], {"a": TAU0, "b": TAU0})
    changed = (hidden != 1).any(dim=1).tolist()
    assert changed == [True] + [False] * 8  # research code would have skipped the whole step
    assert rt.decode_steps == 1 and rt.prefill_steps == 1
    assert int(rt.counters["suppressed"][1]) == 1


def test_last_prompt_chunk_is_prefill_and_first_generated_token_is_decode():
    rt = make_runtime()
    hidden = run_step(rt, [("a", 3, 2, 5)], {"a": TAU0})  # positions 2,3,4: all prompt
    assert not (hidden != 1).any()
    hidden = run_step(rt, [("a", 1, 5, 5)], {"a": TAU0})  # position 5: the first output token
    assert (hidden != 1).all()


def test_recomputed_output_tokens_after_preemption_are_edited_again_but_not_counted():
    rt = make_runtime()
    run_step(rt, [("a", 6, 0, 6)], {"a": TAU0})
    for pos in range(6, 10):
        run_step(rt, [("a", 1, pos, 6)])
    assert int(rt.counters["suppressed"][1]) == 4
    # preempted, then recomputed from scratch: positions 0..9 come back in one chunk; the
    # prompt (0..5) stays untouched, the four output tokens get their edits again
    hidden = run_step(rt, [("a", 10, 0, 6)])
    assert (hidden[:6] == 1).all() and (hidden[6:] != 1).all()
    assert int(rt.counters["suppressed"][1]) == 4 and int(rt.counters["tokens"][1]) == 4
    hidden = run_step(rt, [("a", 1, 10, 6)])
    assert (hidden != 1).all()
    assert int(rt.counters["suppressed"][1]) == 5


FORCED_TTTS = {"telltale_method": "ttts", "telltale_tau_json": '{"1": 0.001, "2": 0.001}',
               "telltale_gamma": 1e30, "telltale_low_k": 1, "telltale_p_inject": 1.0,
               "telltale_cos_min": -1.0, "telltale_cooldown": 1}


def ttts_states(position: int, layer: int):
    """The (hidden, residual) a layer produces for a position: fixed per (position, layer),
    as in a recomputation."""
    gen = torch.Generator().manual_seed(1000 * layer + position)
    return torch.randn(H, generator=gen), torch.randn(H, generator=gen)


def ttts_forward(rt, positions, computed, prompt):
    """One step of request "a" over `positions`; returns each layer's edited hidden."""
    rt.begin_step(["a"], np.array([len(positions)]), np.array([computed]), np.array([prompt]),
                  lambda rid: (FORCED_TTTS, 7, 0))
    out = {}
    for layer in (1, 2):
        hidden, residual = (torch.stack(t) for t in zip(*(ttts_states(p, layer)
                                                            for p in positions)))
        rt.on_layer(layer, hidden, residual)
        out[layer] = hidden
    rt.end_step()
    return out


@pytest.mark.parametrize("log", [128, 3])
def test_ttts_injections_are_replayed_into_recomputed_tokens(log):
    rt = make_runtime(VLLM_PATCH="ttts", TTTS_REPLAY_LOG=str(log))
    ttts_forward(rt, range(4), 0, 4)  # the prompt
    decoded = {pos: ttts_forward(rt, [pos], pos, 4) for pos in range(4, 12)}
    injections = int(rt.counters["injections"].sum())
    assert injections >= 6  # every other token, on both layers
    banks = {name: rt.states.buffer(name).clone() for name in ("ttts_bank", "ttts_bank_norm",
                                                               "ttts_streaks")}
    # preempted; recomputed from scratch in one chunk
    again = ttts_forward(rt, range(12), 0, 4)
    replayed = int(rt.counters["injections_replayed"].sum())
    assert replayed == min(injections, log)
    assert int(rt.counters["injections_unlogged"].sum()) == injections - replayed
    assert int(rt.counters["injections"].sum()) == injections  # not counted again
    live = slice(0, rt.states.null_slot)  # the null slot's row is scratch: writes land there
    for name, before in banks.items():  # replay leaves the banks alone
        assert torch.equal(rt.states.buffer(name)[live], before[live]), name
    matches = [torch.equal(again[layer][pos], decoded[pos][layer][0])
               for pos in range(4, 12) for layer in (1, 2)]
    if log >= injections:  # every recomputed token equals the token as decoded
        assert all(matches)
    else:  # the first `log` injections (in decode order) are replayed, the rest are not
        assert sum(not m for m in matches) == injections - log


def test_per_request_method_off_and_unpatched_layers_are_untouched():
    rt = make_runtime()
    extra = {"a": TAU0, "b": {**TAU0, "telltale_method": "off"}}
    hidden = run_step(rt, [("a", 1, 7, 5), ("b", 1, 9, 5)], extra)
    assert (hidden[0] != 1).all() and (hidden[1] == 1).all()
    hidden = run_step(rt, [("a", 1, 8, 5), ("b", 1, 10, 5)], layer=3)  # layer 3 not patched
    assert (hidden == 1).all()


def test_padding_past_the_scheduled_tokens_is_untouched():
    rt = make_runtime()
    hidden = run_step(rt, [("a", 1, 7, 5)], {"a": TAU0}, pad=3)
    assert (hidden[0] != 1).all() and (hidden[1:] == 1).all()


def test_all_off_step_changes_and_counts_nothing():
    rt = make_runtime(VLLM_PATCH="monitor")
    hidden = run_step(rt, [("a", 1, 7, 5)], {"a": {"telltale_method": "off"}})
    assert (hidden == 1).all() and rt.decode_steps == 0
    assert all(int(c.sum()) == 0 for c in rt.counters.values())


def test_adaptive_tau_waits_for_warmup():
    rt = make_runtime(ADAPTIVE_WARMUP_STEPS="3", ADAPTIVE_IQR_K="0", ADAPTIVE_MIN_IQR="0")
    gen = torch.Generator().manual_seed(0)
    suppressed = []
    for step in range(6):
        rt.begin_step(["a", "b"], np.array([1, 1]), np.array([5 + step, 5 + step]),
                      np.array([5, 5]), lambda rid: (None, None, 0))
        hidden = torch.randn(2, H, generator=gen)
        before = hidden.clone()
        rt.on_layer(1, hidden, torch.zeros(2, H))
        rt.end_step()
        suppressed.append(int((hidden != before).any(dim=1).sum()))
    assert suppressed[:3] == [0, 0, 0]  # statistics only during warm-up
    assert sum(suppressed[3:]) > 0  # then tokens above Q3 are suppressed
    assert rt.default_tau(1) is not None


def test_quartiles_are_searched_only_for_steps_that_read_the_adaptive_tau():
    """A step whose acting tokens all have a fixed tau leaves the per-step quartiles as they
    were; a step with an adaptive one searches them first (from the steps before it)."""
    rt = make_runtime()
    q = rt.quantiles

    def step(reqs, scale):
        rt.begin_step([r for r, _ in reqs], np.ones(len(reqs)), np.array([p for _, p in reqs]),
                      np.full(len(reqs), 5), lambda rid: (TAU0 if rid == "fixed" else None,
                                                          None, 0))
        rt.on_layer(1, torch.full((len(reqs), H), scale), torch.zeros(len(reqs), H))
        rt.end_step()

    for i in range(3):  # fixed tau only: the histogram fills, the quartiles are not searched
        step([("fixed", 5 + i)], 1.0 + i)
    assert float(q.total[1]) == 3 and torch.isnan(q.step_quartiles).all()
    before = q.quantiles(1, [0.25, 0.75]).float()
    step([("fixed", 8), ("adaptive", 5)], 10.0)
    assert torch.equal(q.step_quartiles[1], before)
    step([("fixed", 9)], 20.0)  # the histogram moves on, the quartiles stay
    assert float(q.total[1]) == 6 and torch.equal(q.step_quartiles[1], before)
    assert not torch.equal(q.quantiles(1, [0.25, 0.75]).float(), before)


def test_release_frees_state_and_unknown_ids_are_ignored():
    rt = make_runtime(capacity=100)
    run_step(rt, [(f"r{i}", 1, 7, 5) for i in range(100)])
    assert len(rt.states) == 100 and rt.states.capacity == 100
    rt.release([f"r{i}" for i in range(100)] + ["never-seen"])
    assert len(rt.states) == 0
    run_step(rt, [("new", 1, 7, 5)], {"new": TAU0})  # slots are reused with fresh settings
    assert len(rt.states) == 1


def test_invalid_request_settings_run_unpatched_and_are_counted():
    rt = make_runtime()
    hidden = run_step(rt, [("a", 1, 7, 5)], {"a": {**TAU0, "telltale_max_extra": "x"}})
    assert (hidden == 1).all() and rt.rejected_requests == 1


def test_seeds_come_from_the_request_else_the_server_and_differ_per_sample():
    rt = make_runtime(VLLM_RANDOM_SEED="99")
    rt.begin_step(["0_p", "1_p", "s"], np.array([1, 1, 1]), np.array([5, 5, 5]),
                  np.array([5, 5, 5]),
                  lambda rid: (None, 7 if rid == "s" else None, int(rid[0] == "1")))
    keys = rt.buffers.layer_key  # on the device, as the layer steps read it
    layers = list(rt.patched_layers)
    for token, (req_id, seed) in enumerate((("0_p", 99), ("1_p", 100), ("s", 7))):
        expect = rng.layer_key(np.int64(seed), rng.STREAM_SUPPRESS, np.arange(4))
        assert keys[:, token].tolist() == expect[layers].tolist()


def test_snapshot_reports_counters_and_quartiles():
    rt = make_runtime()
    run_step(rt, [("a", 1, 7, 5), ("b", 1, 7, 5)], {"a": TAU0, "b": TAU0})
    snap = rt.snapshot()
    assert snap["decode_steps"] == 1 and snap["live_requests"] == 2
    layer = snap["per_layer"]["1"]
    assert layer["tokens"] == 2 and layer["suppressed"] == 2
    assert layer["median"] == pytest.approx(2 * 8**0.5, rel=0.004)  # x = 2 in each of 8 dims
    assert snap["per_layer"]["2"]["tokens"] == 0


def test_traces_record_decode_steps_and_leave_on_release():
    rt = make_runtime()
    rerank = {"telltale_method": "rerank", "telltale_tau_json": '{"1": 100, "2": 100}'}
    extra = {"a": {**TAU0, "telltale_trace": 1}, "b": TAU0, "c": {**rerank, "telltale_trace": 1},
             "d": rerank}
    run_step(rt, [(r, 3, 0, 3) for r in "abcd"], extra)  # prefill
    for pos in range(3, 7):  # four decode steps, layer 1 only
        run_step(rt, [(r, 1, pos, 3) for r in "abcd"])
    rt.release(list("abcd"))
    traces = {t.request_id: t for t in rt.traces.take()}
    assert set(traces) == {"a", "c"}  # b was not traced; d's rows were only pushed
    a = traces["a"]
    assert a.layers == (1, 2) and a.norm.shape == (4, 2)
    assert np.allclose(a.norm[:, 0], 2 * 8**0.5) and (a.norm[:, 1] == 0).all()  # layer 2 idle
    assert (a.action[:, 0] == 1).all()  # suppressed every step
    assert traces["c"].scores["A"] == pytest.approx(4 * 2 * 8**0.5, rel=1e-5)
    assert traces["c"].scores["metric"] == "mean" and (traces["c"].action == 0).all()
    assert rt.traces.take() == []
    assert rt.snapshot()["rerank_requests"] == 2


def test_rerank_rows_are_pushed_once_each_with_the_settings_on_the_first_output():
    from telltale_norm.push import Candidate

    rt = make_runtime()
    extra = {"c": {"telltale_method": "rerank", "telltale_tau_json": '{"1": 100}',
                   "telltale_layers": "1", "telltale_metric": "A"}, "b": TAU0}
    run_step(rt, [("c", 2, 0, 5), ("b", 3, 0, 3)], extra)  # c's prefill is not done yet
    assert rt.take_push(lambda rid: rid == "b") == {}  # nothing for b, nothing sampled for c
    run_step(rt, [("c", 3, 2, 5), ("b", 1, 3, 3)])
    first = rt.take_push(lambda rid: True)
    assert list(first) == ["c"] and "rows" not in first["c"]
    candidate = Candidate(first["c"]["scoring"])
    assert candidate.scoring["layers"] == [1] and candidate.scoring["metric"] == "A"
    for pos in range(5, 8):
        run_step(rt, [("c", 1, pos, 5), ("b", 1, pos - 1, 3)])
        payload = rt.take_push(lambda rid: True)
        assert list(payload) == ["c"] and list(payload["c"]) == ["rows"]
        candidate.add(payload["c"]["rows"])
    assert rt.take_push(lambda rid: True) == {}  # collected once
    rows = candidate.rows()
    assert rows.shape == (3, 1, 2)
    np.testing.assert_allclose(rows[:, 0, 0], 2 * 8**0.5, rtol=1e-6)
    assert (rows[:, 0, 1] == 100).all()
    # four tokens received: the three decode steps; a stop string after two: the first one
    assert candidate.scores([0] * 5, [7, 8, 9, 10])["A"] == pytest.approx(3 * 2 * 8**0.5)
    assert candidate.scores([0] * 5, [7, 8])["steps"] == 1


def test_eager_steps_that_skip_unused_methods_equal_steps_doing_every_method(monkeypatch):
    """Eagerly, a step skips the work of methods none of its tokens use; traced, it does
    all of it. Over steps of changing mixes (monitor alone, ttts joining, suppress and a
    traced rerank request, a request finishing), both give the same edits, counters,
    banks and traces."""
    import telltale_norm.layer as layer_module

    forced = {"telltale_method": "ttts", "telltale_tau_json": '{"1": 0.5, "2": 0.5}',
              "telltale_gamma": 1e30, "telltale_low_k": 2, "telltale_p_inject": 1.0,
              "telltale_cos_min": -1.0, "telltale_cooldown": 1}
    extra = {"m": {"telltale_method": "monitor"}, "t": forced,
             "s": {"telltale_method": "suppress", **TAU0},
             "r": {"telltale_method": "rerank", "telltale_trace": 1}}
    schedule = [[("m", 4, 0, 4)]] + [[("m", 1, 4 + i, 4)] for i in range(2)]
    schedule += [[("m", 1, 6 + i, 4), ("t", 1 + 3 * (i == 0), 3 * (i > 0) + i, 3)]
                 for i in range(4)]
    schedule += [[("t", 1, 7 + i, 3), ("s", 1 + 2 * (i == 0), 2 * (i > 0) + i, 2),
                  ("r", 1 + 2 * (i == 0), 2 * (i > 0) + i, 2)] for i in range(4)]

    def run(every: bool):
        monkeypatch.setattr(layer_module, "_graph_building", lambda hidden: every)
        rt = make_runtime(VLLM_PATCH="monitor")
        gen = torch.Generator().manual_seed(3)
        outputs = []
        for reqs in schedule:
            ids = [r[0] for r in reqs]
            rt.begin_step(ids, np.array([r[1] for r in reqs]), np.array([r[2] for r in reqs]),
                          np.array([r[3] for r in reqs]), lambda rid: (extra[rid], None, 0))
            t = sum(r[1] for r in reqs)
            for layer in (1, 2):
                hidden, residual = torch.randn(t, H, generator=gen), torch.randn(t, H,
                                                                                 generator=gen)
                rt.on_layer(layer, hidden, residual)
                outputs.append(hidden)
            rt.end_step()
        rt.release(["m", "t", "s", "r"])
        banks = {name: rt.states.buffer(name)[:rt.states.null_slot].clone()
                 for name in ("ttts_bank", "ttts_bank_norm", "ttts_streaks")}
        return outputs, {k: v.clone() for k, v in rt.counters.items()}, banks, rt.traces.take()

    skipping, every = run(False), run(True)
    for a, b in zip(skipping[0], every[0]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert int(every[1]["injections"].sum()) > 0 and int(every[1]["suppressed"].sum()) > 0
    for name in every[1]:
        assert torch.equal(skipping[1][name], every[1][name]), name
    for name in every[2]:
        assert torch.equal(skipping[2][name], every[2][name]), name
    assert [t.to_dict() for t in skipping[3]] == [t.to_dict() for t in every[3]]
    assert len(every[3]) == 1  # the traced rerank request


def test_traced_the_step_is_one_region_called_at_every_patched_layer():
    """The compiler traces (and compiles) the step once for all patched layers: layers are
    told apart by their key tensors, never by Python numbers. The traced graph acts as the
    eager step does."""
    env = {"PATCHED_LAYERS": "1,2,3"}
    extra = {"telltale_method": "suppress", "telltale_tau_json": '{"1": 0, "2": 0, "3": 0}'}
    bodies, calls = set(), []

    def backend(gm, example_inputs):
        for node in gm.graph.nodes:
            if node.target is torch.ops.higher_order.invoke_subgraph:
                calls.append(node)
                bodies.add(node.args[0].target)
        return gm.forward  # run the traced graph as it is

    def steps(rt, hidden, residual):
        for layer in (1, 2, 3):
            hidden, residual, _ = rt.layer_step(layer, hidden, residual)
        return hidden

    hidden, residual = torch.randn(3, H), torch.randn(3, H)
    outputs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        rt = make_runtime(**env)
        rt.begin_step(["a", "b"], np.array([1, 2]), np.array([5, 0]), np.array([5, 9]),
                      lambda rid: (extra, None, 0))
        run = torch.compile(steps, backend=backend, fullgraph=True) if compiled else steps
        outputs.append((run(rt, hidden, residual), rt.counters["suppressed"].clone(),
                        rt.counters["tokens"].clone()))
    assert len(calls) == 3 and len(bodies) == 1
    (eager, *eager_counts), (traced, *traced_counts) = outputs
    assert torch.equal(eager, traced) and not torch.equal(eager, hidden)
    for a, b in zip(eager_counts, traced_counts):
        assert torch.equal(a, b)
    assert eager_counts[0].tolist() == [0, 1, 1, 1]  # the decode token, at each layer
