"""`PYTHONPATH=vllm_patches/monitor python script.py`: any vLLM script with `VLLM_PATCH=monitor`."""
__import__("telltale_norm.shim").shim.activate(__file__)
