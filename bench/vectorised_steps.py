"""ERSS's and LRS's per-step work, vectorised against per-token loops with the research
code's structure, on random tensors (the ERSS loop is checked to give the same deltas,
streaks and cooldowns). bench/step_time.py and bench/overhead.py report it.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time


def step_benchmark(batches: list[int], hidden: int = 576, reps: int = 20) -> dict:
    """Per-step ERSS and LRS work: vectorised vs per-token loops, on random tensors. The
    ERSS loop must give the vectorised step's deltas, streaks and cooldowns (checked)."""
    import torch

    from telltale_norm.methods.ttts import BankState, TttsSettings, ttts_step

    k = 32
    out: dict[str, dict[int, float]] = {"ttts_vectorised_ms": {}, "ttts_loop_ms": {},
                                         "lrs_vectorised_ms": {}, "lrs_loop_ms": {}}
    gen = torch.Generator().manual_seed(0)
    for b in batches:
        x = torch.randn(b, hidden, generator=gen)
        res = torch.randn(b, hidden, generator=gen)
        norms = torch.linalg.vector_norm(x, dim=1)
        tau = norms.median().expand(b)
        # half-full banks, streaks about to trigger, some requests cooling down
        bank = torch.randn(b, k, hidden, generator=gen)
        bank_norm = torch.linalg.vector_norm(bank, dim=2)
        bank_norm[:, k // 2:] = -math.inf
        state = BankState(bank, bank_norm,
                          torch.full((b,), 39), torch.randint(0, 2, (b,), generator=gen))
        # SPEC defaults, but injecting more often (p 0.5, cos_min 0) so every path runs
        s = TttsSettings(*(torch.full((b,), float(v)) for v in (40, 1.0, 0.5, 0.5, 32, k,
                                                                0.0)))
        draws = torch.rand(b, generator=gen)
        eligible = torch.rand(b, generator=gen) < 0.9
        vec = ttts_step(x, res, norms, tau, eligible, draws, state, s)
        loop = _ttts_per_token(x, res, norms, tau, eligible, draws, _copy(state), s)
        torch.testing.assert_close(loop[0], vec.delta)
        assert loop[1].tolist() == vec.low_streak.tolist()
        assert loop[2].tolist() == vec.cooldown.tolist()
        out["ttts_vectorised_ms"][b] = _time(lambda: ttts_step(
            x, res, norms, tau, eligible, draws, state, s), reps)
        out["ttts_loop_ms"][b] = _time(
            lambda st: _ttts_per_token(x, res, norms, tau, eligible, draws, st, s), reps,
            setup=lambda: _copy(state))
        # LRS: one step's per-token scoring work for b requests over 6 layers (the final
        # scores are computed once per request when it finishes)
        n6 = torch.rand(b, 6) * 40
        t6 = torch.full((6,), 20.0)
        out["lrs_vectorised_ms"][b] = _time(lambda: (n6.sum(0), (n6 - t6).clamp_min(0).sum(0),
                                                      (n6 > t6).sum(0)), reps)
        out["lrs_loop_ms"][b] = _time(lambda: _lrs_per_token(n6, t6), reps)
    return out


def _copy(state):
    """A fresh copy of a bank state (the per-token loop edits its state in place)."""
    return dataclasses.replace(state, **{f.name: getattr(state, f.name).clone()
                                         for f in dataclasses.fields(state)})


def _ttts_per_token(x, res, norms, tau, eligible, draws, state, s):
    """The research code's structure: ERSS's rules (SPEC.md "ttts") token by token in
    Python, editing the request's bank, streak and cooldown in place. Returns the deltas,
    streaks and cooldowns."""
    import torch

    delta = torch.zeros_like(x)
    for i in range(x.shape[0]):
        if not bool(eligible[i]):
            continue
        n, t, k = float(norms[i]), float(tau[i]), int(s.bank_k[i])
        bank, bank_norm = state.bank[i, :k], state.bank_norm[i, :k]
        if n > t:
            j = int(torch.argmin(bank_norm))
            if n > float(bank_norm[j]):
                bank[j] = x[i]
                bank_norm[j] = n
        state.low_streak[i] = int(state.low_streak[i]) + 1 if n < float(s.gamma[i]) * t else 0
        state.cooldown[i] = max(int(state.cooldown[i]) - 1, 0)
        if (int(state.low_streak[i]) >= int(s.low_k[i]) and int(state.cooldown[i]) == 0
                and float(draws[i]) < float(s.p_inject[i])):
            cos = torch.nn.functional.cosine_similarity(bank, x[i].unsqueeze(0), dim=-1)
            cos = cos.masked_fill(~torch.isfinite(bank_norm), -math.inf)
            j = int(torch.argmax(cos))
            if float(cos[j]) >= float(s.cos_min[i]):
                delta[i] = float(s.beta[i]) * (bank[j] - res[i])
                state.low_streak[i] = 0
                state.cooldown[i] = int(s.cooldown[i])
    return delta, state.low_streak, state.cooldown


def _lrs_per_token(n6, t6) -> None:
    for i in range(n6.shape[0]):
        for layer in range(n6.shape[1]):
            n, t = float(n6[i, layer]), float(t6[layer])
            _ = (n, max(0.0, n - t), n > t)


def _time(fn, reps: int, setup=None) -> float:
    """Median ms of `fn()`, or of `fn(setup())` with `setup` left out of the timing."""
    call = fn if setup is None else (lambda: fn(setup()))
    call()
    times = []
    for _ in range(reps):
        arg = () if setup is None else (setup(),)
        start = time.perf_counter()
        fn(*arg)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)
