"""`PYTHONPATH=vllm_patches/ttts python script.py`: any vLLM script with `VLLM_PATCH=ttts`."""
__import__("telltale_norm.shim").shim.activate(__file__)
