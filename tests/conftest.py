"""Shared fixtures: models made at test time, and real vLLM engines (shared per module)."""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Small, fast and exact enough to compare tokens: fp32 tiny models, eager unless a test asks.
ENGINE_DEFAULTS = dict(enforce_eager=True, dtype="float32", max_model_len=512,
                       gpu_memory_utilization=0.2, seed=0, max_num_seqs=32,
                       max_num_batched_tokens=2048)

TELLTALE_ENV = ("VLLM_PATCH", "VLLM_PLUGINS", "PATCHED_LAYERS", "PATCHED_TAU_JSON")


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


@contextlib.contextmanager
def vllm_engine(model: Path | str, env: Mapping[str, str] | None = None,
                **kwargs) -> Iterator:
    """A real `vllm.LLM` started with `env` set (its engine processes inherit it)."""
    from vllm import LLM

    from telltale_norm.vllm_adapter.plugin import register

    env = dict(env or {})
    saved = {k: os.environ.get(k) for k in set(env) | set(TELLTALE_ENV)}
    for key in TELLTALE_ENV:
        os.environ.pop(key, None)
    os.environ.update(env)
    # vLLM loads plugins once per process; engines started later in this test process need
    # the frontend patches installed for their own settings.
    register()
    llm = None
    try:
        llm = LLM(model=str(model), **{**ENGINE_DEFAULTS, **kwargs})
        yield llm
    finally:
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def greedy(max_tokens: int = 24, **extra):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                          extra_args=extra or None)


def token_ids(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea:",
    "1, 2, 3, 4,",
    "Question: what is 17 + 25? Answer:",
]


SERVER_ENV = {"VLLM_PATCH": "monitor", "PATCHED_LAYERS": "1,2"}


@pytest.fixture(scope="session")
def monitor_server(tiny_model, tmp_path_factory):
    """One `vllm serve` of the tiny Llama for the whole session (VLLM_PATCH=monitor on layers
    1,2: it changes nothing by itself); tests pick methods per request with `vllm_xargs`."""
    from processes import VllmServer

    server = VllmServer(tiny_model("llama"), SERVER_ENV,
                        tmp_path_factory.mktemp("serve") / "serve.log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
