"""`PYTHONPATH=vllm_patches/suppress python script.py`: any vLLM script with `VLLM_PATCH=suppress`."""
__import__("telltale_norm.shim").shim.activate(__file__)
