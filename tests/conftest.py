"""Shared fixtures: models made at test time, and real vLLM engines (shared per module)."""

from __future__ import annotations

import contextlib
import gc
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Small, fast and exact enough to compare tokens: fp32 tiny models, eager unless a test asks.
# An explicit KV size skips the CPU worker's check that gpu_memory_utilization of the RAM is
# free (engines of other tests may still be going away).
ENGINE_DEFAULTS = dict(enforce_eager=True, dtype="float32", max_model_len=512,
                       gpu_memory_utilization=0.2, kv_cache_memory_bytes=256 << 20, seed=0,
                       max_num_seqs=32, max_num_batched_tokens=2048)

TELLTALE_ENV = ("VLLM_PATCH", "VLLM_PLUGINS", "PATCHED_LAYERS", "PATCHED_TAU_JSON",
                "TELLTALE_ALLOW_LOOP")


def pytest_collection_modifyitems(items):
    # Tests that take an engine or server fixture are marked, so `-m "not engine"` runs the
    # fast tier.
    for item in items:
        names = getattr(item, "fixturenames", ())
        if any(name == "llm" or name.startswith("llm_") or "engine" in name
               or name.endswith("_server") for name in names):
            item.add_marker(pytest.mark.engine)


@pytest.fixture(scope="session")
def default_model() -> Path:
    from telltale_norm.models import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, default_model):
    """`tiny_model(arch)` -> path of a tiny random fp32 model (made once per session)."""
    from telltale_norm.models import make_tiny_model

    made: dict[str, Path] = {}

    def make(arch: str = "llama") -> Path:
        if arch not in made:
            made[arch] = make_tiny_model(tmp_path_factory.mktemp(f"tiny-{arch}"), arch)
        return made[arch]

    return make


@pytest.fixture(scope="session")
def think_model(tmp_path_factory, default_model) -> Path:
    """The tiny Llama with `<think>` and `</think>` added to its tokenizer (reasoning spans)."""
    from telltale_norm.models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-think"), "llama",
                           extra_special_tokens=("<think>", "</think>"))


@contextlib.contextmanager
def telltale_env(env: Mapping[str, str] | None = None) -> Iterator[None]:
    """Set `env` (and clear the other telltale variables) with the plugin's frontend patches
    installed for it, as a process that starts with that environment would have them."""
    from telltale_norm.vllm_adapter.plugin import register

    env = dict(env or {})
    saved = {k: os.environ.get(k) for k in set(env) | set(TELLTALE_ENV)}
    for key in TELLTALE_ENV:
        os.environ.pop(key, None)
    os.environ.update(env)
    # vLLM loads plugins once per process; engines started later in this test process need
    # the frontend patches installed for their own settings.
    register()
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def vllm_engine(model: Path | str, env: Mapping[str, str] | None = None,
                **kwargs) -> Iterator:
    """A real `vllm.LLM` started with `env` set (its engine processes inherit it)."""
    from vllm import LLM

    with telltale_env(env):
        llm = None
        try:
            llm = LLM(model=str(model), **{**ENGINE_DEFAULTS, **kwargs})
            yield llm
        finally:
            if llm is not None:
                llm.llm_engine.engine_core.shutdown()
                del llm
                gc.collect()


def greedy(max_tokens: int = 24, **extra):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                          extra_args=extra or None)


def token_ids(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


def run_staggered(llm, requests, abort_after=None):
    """Add requests at given engine steps, abort some once every candidate has produced a
    given number of tokens, and step the engine to the end.

    `requests`: (start_step, request_id, prompt, SamplingParams); `abort_after`: request_id
    -> tokens. Returns the final RequestOutput of each finished request by id, and the ids
    aborted while decoding.
    """
    engine = llm.llm_engine
    pending = sorted(requests, key=lambda r: r[0])
    abort_after = dict(abort_after or {})
    done = {}
    aborted = []
    step = 0
    while pending or engine.has_unfinished_requests():
        while pending and pending[0][0] <= step:
            _, rid, prompt, params = pending.pop(0)
            engine.add_request(rid, prompt, params)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
            elif min(len(c.token_ids) for c in out.outputs) >= abort_after.get(
                    out.request_id, float("inf")):
                # (an n > 1 request may report once per candidate in one step)
                del abort_after[out.request_id]
                engine.abort_request([out.request_id])
                aborted.append(out.request_id)
        step += 1
    return done, aborted


def wait_traces(llm, keys, timeout=60.0):
    """Traces of finished requests by (request_id, index); finish notices arrive one engine
    step after the caller sees the output, so poll."""
    import telltale_norm

    found = {}
    deadline = time.monotonic() + timeout
    while True:
        for trace in telltale_norm.traces(llm):
            found[(trace.request_id, trace.index)] = trace
        missing = [key for key in keys if key not in found]
        if not missing:
            return found
        assert time.monotonic() < deadline, f"no trace for {missing}"
        time.sleep(0.05)


PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea:",
    "1, 2, 3, 4,",
    "Question: what is 17 + 25? Answer:",
]


SERVER_ENV = {"VLLM_PATCH": "monitor", "PATCHED_LAYERS": "1,2", "TELLTALE_ALLOW_LOOP": "1"}


@pytest.fixture(scope="session")
def monitor_server(tiny_model, tmp_path_factory):
    """One `vllm serve` of the tiny Llama for the whole session (VLLM_PATCH=monitor on layers
    1,2: it changes nothing by itself; loop allowed); tests pick methods per request with
    `vllm_xargs`."""
    from processes import VllmServer

    server = VllmServer(tiny_model("llama"), SERVER_ENV,
                        tmp_path_factory.mktemp("serve") / "serve.log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
