"""ERSS step (vectorised over requests) against a deliberately simple per-token loop."""

import dataclasses
import math
import random

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from telltale_norm.methods.ttts import BankState, TttsSettings, ttts_step

H, K = 4, 3


def reference_step(x, res, n, tau, eligible, u, bank, low, cd, s):
    """SPEC.md "ttts", one request at a time, as plain Python over lists."""
    if not eligible:
        return bank, low, cd, [0.0] * H, False, False
    bank = [list(entry) for entry in bank]
    cd = max(cd - 1, 0)
    if n > tau:
        bank.append((n, list(x)))
        bank.sort(key=lambda e: -e[0])  # keep the BANK_K highest norms
        bank = bank[:s["bank_k"]]
    low = low + 1 if n < s["gamma"] * tau else 0
    delta, injected, no_match = [0.0] * H, False, False
    if low >= s["low_k"] and cd == 0 and u < s["p_inject"]:
        best, best_cos = None, -math.inf
        for _, v in bank:
            dot = sum(a * b for a, b in zip(v, x))
            norm = math.sqrt(sum(a * a for a in v)) * math.sqrt(sum(a * a for a in x))
            cos = dot / max(norm, 1e-8)
            if cos > best_cos:
                best, best_cos = v, cos
        if best is not None and best_cos >= s["cos_min"]:
            delta = [s["beta"] * (v - r) for v, r in zip(best, res)]
            low, cd, injected = 0, s["cooldown"], True
        else:
            no_match = True
    return bank, low, cd, delta, injected, no_match


def to_state(banks, lows, cds):
    bank = torch.zeros(len(banks), K, H)
    norm = torch.full((len(banks), K), -math.inf)
    for i, entries in enumerate(banks):
        for j, (n, v) in enumerate(entries):
            bank[i, j] = torch.tensor(v)
            norm[i, j] = n
    return BankState(bank, norm, torch.tensor(lows), torch.tensor(cds))


def from_state(state, i):
    entries = [(float(state.bank_norm[i, j]), state.bank[i, j].tolist()) for j in range(K)
               if math.isfinite(float(state.bank_norm[i, j]))]
    return sorted(entries, key=lambda e: -e[0])


vec = st.lists(st.floats(-3, 3, allow_nan=False, width=32), min_size=H, max_size=H)
request = st.fixed_dictionaries({
    "x": vec, "res": vec, "tau": st.floats(0.5, 3.0, width=32),
    "eligible": st.booleans(), "u": st.floats(0, 0.75, width=32),
    "low_k": st.integers(1, 3), "gamma": st.sampled_from([0.5, 1.0, 2.0]),
    "p_inject": st.sampled_from([0.0, 0.5, 1.0]), "beta": st.sampled_from([0.5, 1.0]),
    "cooldown": st.integers(0, 3), "bank_k": st.integers(1, K),
    "cos_min": st.sampled_from([-1.0, 0.0, 0.5]),
})


@settings(max_examples=60, deadline=None)
@given(st.lists(request, min_size=1, max_size=4), st.integers(4, 12), st.integers(0, 2**32),
       st.booleans())
def test_vectorised_step_equals_per_token_loop(reqs, steps, walk_seed, lazy_bank):
    """`lazy_bank`: the banks come as a function of the trigger mask that gives the rows
    which do not trigger a bank of garbage (what `Banks.read` gives them: another bank)."""
    names = ("low_k", "gamma", "p_inject", "beta", "cooldown", "bank_k", "cos_min")
    s = TttsSettings(**{name: torch.tensor([float(r[name]) for r in reqs]) for name in names})
    banks, lows, cds = [[] for _ in reqs], [0] * len(reqs), [0] * len(reqs)
    state = to_state(banks, lows, cds)
    walk = random.Random(walk_seed)
    for _ in range(steps):
        # fresh states each step: a random walk of the current vector (continuous draws:
        # exactly equal norms, whose order in a bank is arbitrary, do not occur)
        for r in reqs:
            r["x"] = [a + walk.uniform(-1, 1) for a in r["x"]]
        x = torch.tensor([r["x"] for r in reqs])
        res = torch.tensor([r["res"] for r in reqs])
        n = torch.linalg.vector_norm(x, dim=1)
        searched = state
        if lazy_bank:
            searched = dataclasses.replace(state, bank=lambda trigger, bank=state.bank: (
                torch.where(trigger[:, None, None], bank, torch.full_like(bank, 7.0))))
        out = ttts_step(x, res, n, torch.tensor([r["tau"] for r in reqs]),
                        torch.tensor([r["eligible"] for r in reqs]),
                        torch.tensor([r["u"] for r in reqs]), searched, s)
        for i, r in enumerate(reqs):
            cfg = {name: r[name] for name in names}
            banks[i], lows[i], cds[i], delta, injected, no_match = reference_step(
                r["x"], r["res"], float(n[i]), r["tau"], r["eligible"], r["u"],
                banks[i], lows[i], cds[i], cfg)
            assert int(out.low_streak[i]) == lows[i]
            assert int(out.cooldown[i]) == cds[i]
            assert bool(out.injected[i]) == injected and bool(out.no_match[i]) == no_match
            torch.testing.assert_close(out.delta[i], torch.tensor(delta), atol=1e-5, rtol=1e-5)
            got = from_state(out.next_state(state, x), i)
            assert [e[0] for e in got] == [e[0] for e in banks[i]]
            for (_, v), (_, w) in zip(got, banks[i]):
                torch.testing.assert_close(torch.tensor(v), torch.tensor(w))
        state = out.next_state(state, x)


def test_injection_formula_and_cooldown():
    s = TttsSettings(*(torch.tensor([v]) for v in (1, 10.0, 1.0, 0.5, 2, 2, -1.0)))
    x = torch.tensor([[1.0, 0, 0, 0]])
    high = torch.tensor([[4.0, 0, 0, 0]])
    res = torch.tensor([[0.5, 0, 0, 0]])
    state = to_state([[]], [0], [0])
    # a high token fills the bank (and, being below gamma * tau, starts the streak)
    out = ttts_step(high, res, torch.tensor([4.0]), torch.tensor([1.0]), torch.tensor([True]),
                    torch.tensor([0.9]), state, s)
    assert bool(out.injected[0])  # streak 1 >= low_k 1: injects the bank's own entry
    torch.testing.assert_close(out.delta, 0.5 * (high - res))
    assert int(out.cooldown[0]) == 2
    out = ttts_step(x, res, torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([True]),
                    torch.tensor([0.9]), out.next_state(state, high), s)
    assert not bool(out.injected[0]) and int(out.cooldown[0]) == 1


def test_parallel_states_inject_the_one_of_highest_norm():
    s = TttsSettings(*(torch.tensor([v]) for v in (1, 10.0, 1.0, 1.0, 0, 2, 0.5)))
    small, big = torch.tensor([[1.0, 0, 0, 0]]), torch.tensor([[3.0, 0, 0, 0]])
    res = torch.zeros(1, H)
    # bank: the smaller state first, then the larger one (same direction, cosine 1 each)
    state = to_state([[(1.0, small[0].tolist()), (3.0, big[0].tolist())]], [0], [0])
    x = torch.tensor([[0.5, 0, 0, 0]])
    out = ttts_step(x, res, torch.tensor([0.5]), torch.tensor([1.0]), torch.tensor([True]),
                    torch.tensor([0.0]), state, s)
    assert bool(out.injected[0])
    torch.testing.assert_close(out.delta, big)
