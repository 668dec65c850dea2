"""Tensor-parallel ranks take the same loop decisions even when their norms differ in the
last bit: two real `torch.distributed` ranks (gloo) run `loop_step` on inputs one ulp apart
around tau, with a re-run that performs an all-reduce, as a tensor-parallel layer does."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from telltale_norm.methods.loop import loop_step, union_over

TOKENS, HIDDEN = 6, 8


def _rank(rank: int, port: int, agree_over_ranks: bool, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        hidden = torch.ones(TOKENS, HIDDEN)
        residual = torch.zeros(TOKENS, HIDDEN)
        norms = torch.full((TOKENS,), 8 ** 0.5)
        tau = norms.clone()
        # rank 1 sees token 2 a hair above tau (all-reduced sums can differ in the last bit)
        if rank == 1:
            norms[2] = torch.nextafter(norms[2], torch.tensor(100.0))
        passes = []

        def rerun(h, r):  # a tensor-parallel layer: its all-reduce needs every rank
            total = h.clone()
            dist.all_reduce(total)
            passes.append(1)
            return total / 2 * 1.5, r

        agree = union_over(dist.group.WORLD) if agree_over_ranks else (lambda m: m)
        result = loop_step(hidden, residual, norms, tau, torch.ones(TOKENS, dtype=torch.bool),
                           max_extra=torch.full((TOKENS,), 2), growth_eps=torch.zeros(TOKENS),
                           blowup=torch.full((TOKENS,), 1e30), alpha=torch.ones(TOKENS),
                           rerun=rerun, limit=2, agree=agree)
        out[rank] = (len(passes), result.taken.tolist(), result.hidden.tolist())
    finally:
        dist.destroy_process_group()


def _run(agree_over_ranks: bool, port: int) -> dict:
    with mp.Manager() as manager:
        out = manager.dict()
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_rank, args=(r, port, agree_over_ranks, out))
                 for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        alive = [p for p in procs if p.is_alive()]
        for p in alive:
            p.kill()
        return {"hung": bool(alive), **dict(out)}


def test_ranks_agree_on_reruns_when_norms_differ_in_the_last_bit():
    got = _run(agree_over_ranks=True, port=29611)
    assert not got["hung"]
    assert got[0] == got[1]  # same passes, same kept tokens, same new state
    passes, taken, _ = got[0]
    assert passes == 2 and taken == [0, 0, 2, 0, 0, 0]


def test_without_agreement_the_ranks_diverge():
    """What the agreement prevents: rank 1 re-runs alone and its all-reduce never returns
    (or the ranks keep different tokens)."""
    got = _run(agree_over_ranks=False, port=29612)
    assert got["hung"] or got.get(0) != got.get(1)
