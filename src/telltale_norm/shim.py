"""Support for `vllm_patches/<method>/sitecustomize.py` (kept free of heavy imports: it runs
at every interpreter start)."""

from __future__ import annotations

import sys
from importlib.metadata import entry_points


def check_plugin_installed() -> bool:
    """True when vLLM will find the plugin; otherwise say how to install it."""
    found = any(ep.name == "telltale_norm"
                for ep in entry_points(group="vllm.general_plugins"))
    if not found:
        sys.stderr.write("telltale-norm: the vLLM plugin entry point is missing; "
                         "run `pip install -e .` in the telltale-norm checkout\n")
    return found
