"""One step's bookkeeping: the scheduled batch -> each token's slot, kind and position.

The adapter describes a step with plain per-request arrays in batch order (`plan_step`, on the
host, once per step). The result is written into fixed device buffers (`StepBuffers`) that the
per-layer step reads: before the forward, one host-to-device copy of the positions (or two
of the tokens and their settings, when the step's requests changed), from pinned memory on
CUDA (on the CPU the host writes the buffers' memory through numpy). The buffers never move,
so a compiled graph or a CUDA graph that reads them sees each step's values.
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass

import numpy as np
import torch

from telltale_norm.requests import ACTING, METHOD_ID, OFF, PARAM_COLUMNS, RequestStates

# Bits of a token's flags.
DECODE = 1  # a newly decoded output token: observed, counted, edited
REPLAY = 2  # an output token recomputed after a preemption: edited again, not counted
TTTS, LOOP = METHOD_ID["ttts"], METHOD_ID["loop"]


@dataclass(frozen=True)
class StepPlan:
    """A step's tokens on the host (arrays over its `num_tokens` scheduled tokens)."""

    num_tokens: int
    token_slot: np.ndarray  # int64
    position: np.ndarray  # int64
    decode: np.ndarray  # bool
    replay: np.ndarray  # bool
    decode_step: np.ndarray  # int64: position - prompt length (the trace row)
    ttts_rows: np.ndarray  # int64: indices of the decode tokens of ttts requests
    methods: frozenset[int]  # the methods of its decode and replay tokens (OFF left out)
    recorded: bool  # some decode token is traced (its record is copied to the host)
    adaptive: bool  # some token that reads tau (acts, or is recorded) reads the adaptive one
    patched_decode: bool  # some decode token belongs to a patched request (a decode step)
    loop_decode: np.ndarray  # int64: slots of the loop requests' decode tokens

    @property
    def flags(self) -> np.ndarray:
        return self.decode * DECODE + self.replay * REPLAY


# method id -> whether its tokens read tau to act (a lookup: np.isin costs more per step)
_READS_TAU = np.isin(np.arange(len(METHOD_ID)), tuple(ACTING))


def plan_step(states: RequestStates, slots: np.ndarray, num_scheduled: np.ndarray,
              num_computed: np.ndarray) -> StepPlan:
    """Map a step's flattened tokens to requests (arrays per request, in batch order).

    A token is a decode token when its position is at or past the request's prompt length
    and past every position this request had computed before. Output tokens recomputed
    after a preemption are *replay* tokens. Updates each request's high-water mark.
    Runs on the host before every step, so it counts numpy calls (each costs microseconds
    on arrays this small): a step of one token per request needs no flattening.
    """
    num_scheduled = np.asarray(num_scheduled, dtype=np.int64)
    num_computed = np.asarray(num_computed, dtype=np.int64)
    last = num_computed + num_scheduled - 1
    if (num_scheduled == 1).all():  # decode steps: token i is request i's
        token_slot, position = slots, num_computed
    else:
        tok_req = np.repeat(np.arange(len(slots)), num_scheduled)
        first_tok = np.cumsum(num_scheduled) - num_scheduled
        position = num_computed[tok_req] + np.arange(len(tok_req)) - first_tok[tok_req]
        token_slot = slots[tok_req]
    decode_step = position - states.prompt_len[token_slot]
    output = decode_step >= 0
    fresh = position > states.high_water[token_slot]
    decode, replay = output & fresh, output & ~fresh
    states.high_water[slots] = np.maximum(states.high_water[slots], last)
    method = states.method[token_slot]
    ttts_rows = np.flatnonzero(decode & (method == TTTS))
    methods = frozenset(method[output].tolist()) - {OFF}
    traced = decode & states.traced[token_slot]
    # a request's tau is NaN on the layers where it is adaptive
    reads = token_slot[(output & _READS_TAU[method]) | traced]
    adaptive = bool((states.layers[reads] & np.isnan(states.tau[reads])).any())
    return StepPlan(len(token_slot), token_slot, position, decode, replay, decode_step,
                    ttts_rows, methods, bool(traced.any()), adaptive,
                    bool((decode & (method != OFF)).any()),
                    token_slot[decode & (method == LOOP)] if LOOP in methods else _NONE)


_NONE = np.zeros(0, dtype=np.int64)


def advance_plan(last: StepPlan, states: RequestStates, num_scheduled: np.ndarray,
                 num_computed: np.ndarray) -> StepPlan | None:
    """`plan_step` of a step of the same requests as `last`, in the same order, in the same
    slots (none released since), when `last` and this step both decode one new token each
    (most steps of a decode-heavy batch): only the positions move, so the rest of `last`
    is reused as it is (the same arrays, which `StepBuffers.write` recognises). None when
    that is not the case (a prefill chunk, a replay, several tokens per request)."""
    num_scheduled = np.asarray(num_scheduled, dtype=np.int64)
    if len(num_scheduled) != last.num_tokens or not last.decode.all() \
            or not (num_scheduled == 1).all():
        return None
    position = np.asarray(num_computed, dtype=np.int64)
    slots = last.token_slot
    if not (position > states.high_water[slots]).all():  # a position seen before: a replay
        return None
    states.high_water[slots] = position
    return dataclasses.replace(last, position=position,
                               decode_step=position - states.prompt_len[slots])


def _row(packed: str, rows: slice | int) -> property:
    # Taken where it is used, never stored: a traced region whose inputs are views of one
    # buffer is refused (its inputs would alias).
    return property(lambda self: getattr(self, packed)[rows])


class StepBuffers:
    """Fixed device buffers of per-token step metadata, for up to `max_tokens` tokens.

    Rows past a step's tokens (the padding of a CUDA-graph batch) always hold the null slot
    and no flags, so the per-layer step may process every row of its input. `ttts_rows`
    lists the ttts decode tokens first (their count is at most the number of slots) and
    `ttts_slot` their slots; the rest point at token 0 and the null slot. `ttts_row` is the
    inverse, per token: its index in `ttts_rows`, or -1 (a gather puts the rows' results
    back into the step's tokens; a scatter would take a pass of its own).

    Each token's settings (its request's method, parameters, and per patched layer, in the
    order of `layers`: whether it acts there, its fixed tau, its random key) are gathered
    from the host tables when the step's requests change and copied beside them: the
    layer steps read them in token order, where a lookup through each token's slot made
    every traced read a bounds-checked gather (compiling the traced step of six layers:
    20 -> 17 s here).

    `methods` and `recorded` repeat the step's mix on the host. Only an eager step reads
    them, to skip the work of methods no token uses; a traced or captured step ignores them
    (it is replayed for every later mix).
    """

    def __init__(self, states: RequestStates, layers: tuple[int, ...], max_tokens: int,
                 staged: bool | None = None) -> None:
        """`staged`: the step's copies go through a staging tensor (`_upload`); always off
        the CPU, on the CPU only to test that path."""
        self.max_tokens = max_tokens
        self.states, self.layers = states, list(layers)
        device, null = states.device, states.null_slot
        self._null = np.array([null, 0, 0, 0, null, -1], dtype=np.int64)[:, None]
        self._host = np.repeat(self._null, max_tokens, axis=1)
        # a copy on the CPU too: the host rows are written before they are uploaded
        self._packed = torch.from_numpy(self._host).to(device, copy=True)
        # the tokens' settings: ints (method, acts per layer, key per layer), floats
        # (parameters, fixed tau per layer); padding rows hold the null slot's
        self._version = -1  # of the states, when `_slot_settings` last built its rows
        ints, floats = (torch.from_numpy(rows[np.full(max_tokens, null)].T.copy())
                        for rows in self._slot_settings())
        self._ints, self._floats = ints.to(device), floats.to(device)
        self._targets = (self._packed, self._ints, self._floats)
        # how the step's copies go (`_upload`): on the CPU into the buffers' memory through
        # numpy (a torch copy costs microseconds more per step), on CUDA from pinned staging
        staged = device.type != "cpu" if staged is None else staged
        self._views = None if staged else tuple(b.numpy() for b in self._targets)
        # False outside a step: vLLM's warm-up and dummy runs pass through the layer steps
        # too, and must not act on the last step's requests
        self.live = torch.zeros(1, dtype=torch.bool, device=device)
        self._written = 0  # rows the last step wrote (reset to null by the next write)
        self._arrays: tuple[np.ndarray, ...] = (None,) * 4  # whose rows they are
        self.methods: frozenset[int] = frozenset()
        self.recorded = False

    token_slot, position, flags, ttts_rows, ttts_slot, ttts_row = (
        _row("_packed", i) for i in range(6))
    method = _row("_ints", 0)  # [max_tokens]
    layer_tau = _row("_floats", slice(len(PARAM_COLUMNS), None))  # NaN: adaptive

    @property
    def layer_on(self) -> torch.Tensor:
        """`[layers, max_tokens]`, 1 where the token's request acts on the layer."""
        return self._ints[1:1 + len(self.layers)]

    @property
    def layer_key(self) -> torch.Tensor:
        """`[layers, max_tokens]`, the token's `rng.layer_key` for the layer."""
        return self._ints[1 + len(self.layers):]

    @property
    def params(self) -> torch.Tensor:
        """`[max_tokens, len(PARAM_COLUMNS)]`, the token's parameter row (a view: each
        column is a contiguous row of the buffer)."""
        return self._floats[:len(PARAM_COLUMNS)].T

    def _slot_settings(self) -> tuple[np.ndarray, np.ndarray]:
        """Per slot, the rows of settings its tokens take (`[slots, ints]`, `[slots,
        floats]`), rebuilt when a request was admitted or released since."""
        states = self.states
        if states.version != self._version:
            cols = self.layers
            self._slot_rows = (
                np.concatenate([states.method[:, None], states.layers[:, cols],
                                states.rng_key[:, cols]], 1),
                np.concatenate([states.params, states.tau[:, cols]], 1))
            self._version = states.version
        return self._slot_rows

    def write(self, plan: StepPlan) -> None:
        t = plan.num_tokens
        if t > self.max_tokens:
            raise RuntimeError(f"telltale-norm: a step of {t} tokens exceeds the "
                               f"{self.max_tokens} its buffers were sized for")
        host = self._host
        arrays = (plan.token_slot, plan.decode, plan.replay, plan.ttts_rows)
        if all(map(operator.is_, arrays, self._arrays)):  # `advance_plan`'s: rows but the
            host[1, :t] = plan.position  # positions hold the last step's already
            self._upload(((0, slice(1, 2), host[1:2, :t]),))
        else:
            n = max(t, self._written)  # rows the last step wrote go back to the null slot
            host[:, :self._written] = self._null
            host[0, :t], host[1, :t], host[2, :t] = plan.token_slot, plan.position, plan.flags
            host[3, :len(plan.ttts_rows)] = plan.ttts_rows
            host[4, :len(plan.ttts_rows)] = plan.token_slot[plan.ttts_rows]
            host[5, plan.ttts_rows] = np.arange(len(plan.ttts_rows))
            ints, floats = self._slot_settings()
            slot = host[0, :n]
            everything = slice(None)
            self._upload(((0, everything, host[:, :n]), (1, everything, ints[slot].T)))
            self._upload(((2, everything, floats[slot].T),))
            self._arrays = arrays
        self.live.fill_(True)
        self._written = t
        self.methods, self.recorded = plan.methods, plan.recorded

    def _upload(self, parts: tuple[tuple[int, slice, np.ndarray], ...]) -> None:
        """Copy host blocks into the first `n` columns of rows of the buffers: each part is
        (buffer index, its rows, a block `[rows, n]` of its dtype). On CUDA one staging
        tensor carries them, pinned, from PyTorch's caching host allocator, which keeps it
        until its copies have run: a copy from pageable memory may wait for the stream
        (the previous step's forward, under async scheduling), and the host may change
        the blocks before a queued copy reads them."""
        if self._views is not None:
            for index, rows, block in parts:
                self._views[index][rows, :block.shape[1]] = block
            return
        blocks = [block for _, _, block in parts]
        stage = torch.empty((sum(map(len, blocks)), blocks[0].shape[1]),
                            dtype=self._targets[parts[0][0]].dtype,
                            pin_memory=self._packed.is_cuda)
        np.concatenate(blocks, out=stage.numpy())
        for (index, rows, _), part in zip(parts, stage.split([len(b) for b in blocks])):
            self._targets[index][rows, :part.shape[1]].copy_(part, non_blocking=True)

    def close(self) -> None:
        """The step's forward is done (queued): later runs see no step."""
        self.live.fill_(False)
        self.methods, self.recorded = frozenset(), False

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in (self._packed, self._ints,
                                                          self._floats, self.live))
