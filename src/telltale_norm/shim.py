"""`vllm_patches/<method>/sitecustomize.py`: the research code's layout, for its users.

`PYTHONPATH=vllm_patches/loop python script.py` runs any vLLM script with `VLLM_PATCH=loop`:
each shim is one line calling `activate`, which only selects the method named by its
folder; the installed plugin does the work in every vLLM process, which inherit this
environment. Kept free of heavy imports: it runs at every interpreter start.
"""

from __future__ import annotations

import os
import sys
from importlib.metadata import entry_points
from pathlib import Path


def check_plugin_installed() -> bool:
    """True when vLLM will find the plugin; otherwise say how to install it."""
    found = any(ep.name == "telltale_norm"
                for ep in entry_points(group="vllm.general_plugins"))
    if not found:
        sys.stderr.write("telltale-norm: the vLLM plugin entry point is missing; "
                         "run `pip install -e .` in the telltale-norm checkout\n")
    return found


def activate(shim_file: str) -> None:
    """Select the method named by the shim's folder (unless VLLM_PATCH is already set)."""
    os.environ.setdefault("VLLM_PATCH", Path(shim_file).parent.name)
    check_plugin_installed()
