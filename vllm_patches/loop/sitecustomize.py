"""`PYTHONPATH=vllm_patches/loop python script.py`: any vLLM script with `VLLM_PATCH=loop`."""
__import__("telltale_norm.shim").shim.activate(__file__)
