"""The `vllm.general_plugins` entry point. vLLM calls `register()` once in every process it
starts (frontend, engine core, workers) before any model is loaded.

With `VLLM_PATCH` unset/off nothing is patched and vLLM runs unchanged. Otherwise the
environment is validated here (a bad value stops the process with a message naming the
variable), the vLLM version is checked against the tested ones, and the frontend, worker
and server patches are installed; each vLLM internal they touch is checked when its module
is imported (`internals.py`). Installing twice is a no-op.
"""

from __future__ import annotations

import logging

from telltale_norm.config import TelltaleConfig
from telltale_norm.vllm_adapter.internals import TESTED_VLLM

logger = logging.getLogger("vllm.telltale_norm")
_warned: set[str] = set()


def check_vllm_version(version: str, strict: bool) -> None:
    """Tested versions pass quietly; others warn once (every internal is still checked
    where it is used), or are refused with `TELLTALE_STRICT_VLLM=1`."""
    if version.split("+")[0].rsplit(".", 1)[0] in TESTED_VLLM:
        return
    tested = ", ".join(f"{v}.x" for v in TESTED_VLLM)
    if strict:
        raise RuntimeError(
            f"telltale-norm is tested with vLLM {tested}; this is vLLM {version} and "
            "TELLTALE_STRICT_VLLM=1 refuses untested versions. Install a tested vLLM, or "
            "unset TELLTALE_STRICT_VLLM to run with each internal checked where it is used.")
    if version not in _warned:
        _warned.add(version)
        logger.warning("telltale-norm: vLLM %s is untested (tested: %s); every vLLM internal "
                       "it uses is checked when first used (`telltale-norm doctor` lists "
                       "them)", version, tested)


def register() -> None:
    config = TelltaleConfig.from_env()
    if not config.active:
        return
    import vllm

    check_vllm_version(vllm.__version__, config.strict_vllm)
    from telltale_norm.vllm_adapter import engine_core, frontend, outputs, server, worker

    frontend.install()
    worker.install()
    server.install()
    engine_core.install()
    outputs.install()
