"""Write a tiny random OPT model (an architecture telltale-norm cannot patch) with the SmolLM2
tokenizer: `python tests/scripts/make_opt.py OUT_DIR`, or `make_tiny_opt(path)` from a test.

OPT's decoder layers take `forward(hidden_states)` and return one tensor, so the plugin must
refuse it at engine start. vLLM loads OPT on the CPU (head size 32 = hidden 64 / 2 heads).
"""

from __future__ import annotations

import pathlib
import sys


def make_tiny_opt(path, num_layers: int = 4, hidden_size: int = 64) -> pathlib.Path:
    import torch
    from transformers import AutoTokenizer, GenerationConfig, OPTConfig, OPTForCausalLM

    from telltale_norm.models import default_model_dir

    path = pathlib.Path(path)
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    config = OPTConfig(vocab_size=len(tokenizer), hidden_size=hidden_size,
                       num_hidden_layers=num_layers, ffn_dim=2 * hidden_size,
                       num_attention_heads=hidden_size // 32, max_position_embeddings=512,
                       word_embed_proj_dim=hidden_size, do_layer_norm_before=True,
                       init_std=0.1, **special)
    config.architectures = ["OPTForCausalLM"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = OPTForCausalLM(config).eval()
    model.generation_config = GenerationConfig(**special)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


if __name__ == "__main__":
    print(make_tiny_opt(sys.argv[1]))
