"""`PYTHONPATH=vllm_patches/suppress python script.py`: run any vLLM script with `VLLM_PATCH=suppress`.

A shim for users of the research code's layout: it only selects the method; the installed
telltale-norm plugin (`pip install -e .`) does the work in every vLLM process, which inherit
this environment.
"""

import os

os.environ.setdefault("VLLM_PATCH", "suppress")
try:
    from telltale_norm.shim import check_plugin_installed
except ImportError:
    import sys

    sys.stderr.write("telltale-norm is not installed: run `pip install -e .` in its checkout\n")
else:
    check_plugin_installed()
