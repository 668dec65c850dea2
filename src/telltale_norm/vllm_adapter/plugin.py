"""The `vllm.general_plugins` entry point. vLLM calls `register()` once in every process it
starts (frontend, engine core, workers) before any model is loaded.

With `VLLM_PATCH` unset/off nothing is patched and vLLM runs unchanged. Otherwise the
environment is validated here (a bad value stops the process with a message naming the
variable) and the frontend and worker patches are installed. Installing twice is a no-op.
"""

from __future__ import annotations

import logging

from telltale_norm.config import TelltaleConfig

logger = logging.getLogger("vllm.telltale_norm")


def register() -> None:
    config = TelltaleConfig.from_env()
    if not config.active:
        return
    from telltale_norm.vllm_adapter import frontend, server, worker

    frontend.install()
    worker.install()
    server.install()
