"""`PYTHONPATH=vllm_patches/rerank python script.py`: any vLLM script with `VLLM_PATCH=rerank`."""
__import__("telltale_norm.shim").shim.activate(__file__)
