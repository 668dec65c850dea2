"""No host synchronisation and no tensors built from host data inside a layer step.

On CUDA, `bool()`, `int()`, `.item()` (all `aten._local_scalar_dense`), `nonzero`, boolean
indexing and `.tolist()`/`.cpu()`/`.numpy()` wait for the device, and a tensor built from
host data (`torch.tensor(list)`: `aten.lift_fresh`; `torch.from_numpy`) is a blocking copy.
The runtime's steps run here under a dispatch mode that sees every ATen call and count
them, per method; the budget is loop's one documented synchronisation per extra pass."""

from __future__ import annotations

import contextlib
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from telltale_norm.config import TelltaleConfig
from telltale_norm.runtime import TelltaleRuntime

H, LAYERS = 16, (1, 2)
SYNCING = {"aten._local_scalar_dense.default", "aten.nonzero.default",
           "aten.masked_select.default", "aten.unique.default", "aten._unique2.default"}
HOST_DATA = {"aten.lift_fresh.default", "aten.lift_fresh_copy.default"}


class Watch(TorchDispatchMode):
    """Counts syncing ATen calls and tensors made from host data."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name in SYNCING or name in HOST_DATA:
            self.counts[name] += 1
        if name == "aten.index.Tensor" and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
            self.counts["boolean indexing"] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def watched(monkeypatch) -> Counter[str]:
    watch = Watch()
    for owner, name in ((torch.Tensor, "tolist"), (torch.Tensor, "cpu"),
                        (torch.Tensor, "numpy"), (torch, "from_numpy")):
        original = getattr(owner, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            watch.counts[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)
    with watch:
        yield watch.counts
    monkeypatch.undo()


METHODS = {
    "monitor": {"telltale_method": "monitor", "telltale_trace": 1},
    "suppress": {"telltale_method": "suppress", "telltale_tau_json": '{"1": 0, "2": 0}'},
    "suppress_random": {"telltale_method": "suppress", "telltale_suppress_mode": "random",
                        "telltale_random_suppress_p": 0.5},
    "ttts": {"telltale_method": "ttts", "telltale_tau_json": '{"1": 1, "2": 1}',
             "telltale_low_k": 1, "telltale_gamma": 1e30, "telltale_p_inject": 1.0,
             "telltale_cos_min": -1.0, "telltale_cooldown": 1},
    "rerank": {"telltale_method": "rerank", "telltale_tau_json": '{"1": 1, "2": 1}'},
    "adaptive": {"telltale_method": "suppress", "telltale_adaptive_warmup_steps": 0},
    "loop": {"telltale_method": "loop", "telltale_tau_json": '{"1": 1e-3, "2": 1e-3}',
             "telltale_blowup": 1e30, "telltale_growth_eps": -1e30, "telltale_max_extra": 2},
}


def rerun(h, r):
    return h * 1.5, r


@pytest.mark.parametrize("method", sorted(METHODS))
def test_layer_steps_make_no_host_sync_and_build_nothing_from_host_data(method, monkeypatch):
    config = TelltaleConfig.from_env({"VLLM_PATCH": "monitor", "PATCHED_LAYERS": "1,2",
                                      "TELLTALE_ALLOW_LOOP": "1"})
    rt = TelltaleRuntime(config, num_layers=4, hidden_size=H, max_num_seqs=8)
    extra = METHODS[method]
    gen = torch.Generator().manual_seed(0)
    per_layer = []
    for step in range(6):  # a prefill of 4 requests, then decode steps
        n = 4 if step == 0 else 1
        rt.begin_step([f"r{i}" for i in range(4)], np.full(4, n), np.full(4, 0 if step == 0
                                                                          else 3 + step),
                      np.full(4, 4), lambda rid: (extra, None, 0))
        for layer in range(4):
            hidden = torch.randn(4 * n, H, generator=gen)
            residual = torch.randn(4 * n, H, generator=gen)
            with watched(monkeypatch) as counts:
                rt.on_layer(layer, hidden, residual, rerun)
            per_layer.append((step, layer, dict(counts)))
        rt.end_step()
    rt.release([f"r{i}" for i in range(4)])
    allowed = {"aten._local_scalar_dense.default"} if method == "loop" else set()
    for step, layer, counts in per_layer:
        assert set(counts) <= allowed, (step, layer, counts)
        if method == "loop":  # whether a token enters, then one per extra pass (at most 2)
            assert counts.get("aten._local_scalar_dense.default", 0) <= 3
    if method == "loop":
        assert int(rt.counters["reruns"].sum()) > 0  # the budget was exercised
    if method == "ttts":
        assert int(rt.counters["injections"].sum()) > 0


def test_admitting_requests_costs_the_same_for_one_or_many(monkeypatch):
    """A step's settings reach the device in one copy per table, however many requests it
    admits (not several small copies per request)."""
    config = TelltaleConfig.from_env({"VLLM_PATCH": "suppress", "PATCHED_LAYERS": "1,2"})
    copies = []
    for n in (1, 16):
        rt = TelltaleRuntime(config, num_layers=4, hidden_size=H, max_num_seqs=32)
        with watched(monkeypatch) as counts:
            rt.begin_step([f"r{i}" for i in range(n)], np.ones(n), np.full(n, 5), np.full(n, 5),
                          lambda rid: ({"telltale_tau_json": '{"1": 0}'}, None, 0))
        copies.append(counts.get("from_numpy", 0) + counts.get("aten.lift_fresh.default", 0))
    assert copies[0] == copies[1] > 0
