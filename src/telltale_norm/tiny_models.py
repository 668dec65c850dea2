"""Tiny randomly initialised models of several architectures, for fast tests of code that
hooks into a model's layers (see :func:`make_tiny_model`).

Like :mod:`telltale_norm.models` this needs only torch and transformers, not vLLM.
"""

from __future__ import annotations

import os
import pathlib

__all__ = ["TINY_ARCHS", "make_tiny_model"]

#: Architectures :func:`make_tiny_model` can write: dense decoders, then the families people
#: reason with (mixture-of-experts, MLA, hybrid linear/full attention).
TINY_ARCHS: tuple[str, ...] = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3",
                               "gpt_oss", "qwen3_moe", "deepseek_v2", "qwen3_next")

_NUM_HEADS = 4
_NUM_KV_HEADS = 2
# vLLM's CPU attention backend only supports head sizes 32, 64, 80, 96, ...;
# 16 fails at the first forward ("Unsupported CPU attention configuration").
_HEAD_DIM = 32
_MAX_POS = 2048
_EMBED_STD = 0.02
# vLLM's Gemma 2/3 always tie lm_head to the embeddings (an lm_head.weight in
# the checkpoint is an error there); the other families get a separate lm_head.
_ALWAYS_TIED = ("gemma2", "gemma3")
# Families whose head size vLLM computes as hidden_size / num_attention_heads.
_DERIVED_HEAD_DIM = ("qwen2", "phi3")
# vLLM's CPU gated delta-net kernels run in bfloat16 only; everything else defaults to fp32.
_DEFAULT_DTYPE = {"qwen3_next": "bfloat16"}
# Small experts: 4 experts, 2 per token, each half the hidden size wide.
_EXPERTS, _EXPERTS_PER_TOKEN = 4, 2

_PathLike = str | os.PathLike


def _dense_config(arch: str, common: dict, hidden_size: int):
    import transformers

    if arch == "llama":
        return transformers.LlamaConfig(**common), "LlamaForCausalLM"
    if arch in _DERIVED_HEAD_DIM:
        # No usable head_dim setting (vLLM's Qwen2 ignores it, Phi-3 has none): the
        # head size is hidden_size / num_attention_heads, so the head count follows
        # from hidden_size (2 heads and 1 KV head at hidden_size 64).
        if hidden_size % _HEAD_DIM:
            raise ValueError(f"{arch} needs hidden_size divisible by {_HEAD_DIM}, got {hidden_size}")
        heads = hidden_size // _HEAD_DIM
        common.pop("head_dim")
        common.update(num_attention_heads=heads, num_key_value_heads=max(1, heads // 2))
    if arch == "qwen2":
        return transformers.Qwen2Config(use_sliding_window=False, **common), "Qwen2ForCausalLM"
    if arch == "qwen3":
        return transformers.Qwen3Config(use_sliding_window=False, **common), "Qwen3ForCausalLM"
    if arch == "mistral":
        return transformers.MistralConfig(sliding_window=None, **common), "MistralForCausalLM"
    if arch == "gemma2":
        # Attention and final-logit soft-capping as in the real Gemma 2 (the CPU
        # attention kernel implements it); the sliding window of the alternate
        # layers covers the whole context, so it never actually slides.
        return (
            transformers.Gemma2Config(
                hidden_activation="gelu_pytorch_tanh",
                query_pre_attn_scalar=_HEAD_DIM,
                attn_logit_softcapping=50.0,
                final_logit_softcapping=30.0,
                sliding_window=_MAX_POS,
                **common,
            ),
            "Gemma2ForCausalLM",
        )
    if arch == "gemma3":
        # Text-only Gemma 3 (model_type "gemma3_text"): q/k norms, 5:1 local:global layers.
        return (
            transformers.Gemma3TextConfig(
                hidden_activation="gelu_pytorch_tanh",
                query_pre_attn_scalar=_HEAD_DIM,
                sliding_window=_MAX_POS,
                **common,
            ),
            "Gemma3ForCausalLM",
        )
    if arch == "phi3":
        return transformers.Phi3Config(original_max_position_embeddings=_MAX_POS, **common), "Phi3ForCausalLM"
    return None


def _reasoning_config(arch: str, common: dict, num_layers: int, hidden_size: int):
    """The families of reasoning models, in shapes vLLM's CPU kernels accept."""
    import transformers

    experts = dict(num_experts_per_tok=_EXPERTS_PER_TOKEN, moe_intermediate_size=hidden_size // 2)
    if arch == "gpt_oss":
        # Attention sinks; a sliding window of 8 tokens on the even layers (vLLM's rule, and
        # the default layer_types of transformers), so it really slides in short tests;
        # yarn RoPE as the real model's, with the original context shrunk to 64 positions
        # so that its interpolation changes many frequencies; clamped-SwiGLU experts.
        common.update(intermediate_size=hidden_size // 2, num_local_experts=_EXPERTS,
                      num_experts_per_tok=_EXPERTS_PER_TOKEN, sliding_window=8,
                      rope_parameters=dict(rope_type="yarn", rope_theta=150000.0,
                                           factor=_MAX_POS / 64,
                                           original_max_position_embeddings=64,
                                           beta_fast=32.0, beta_slow=1.0, truncate=False))
        return transformers.GptOssConfig(**common), "GptOssForCausalLM"
    if arch == "qwen3_moe":
        return (transformers.Qwen3MoeConfig(num_experts=_EXPERTS, norm_topk_prob=True,
                                            use_sliding_window=False, **experts, **common),
                "Qwen3MoeForCausalLM")
    if arch == "deepseek_v2":
        # MLA: vLLM's CPU MLA kernel needs kv_lora_rank + qk_rope_head_dim = 576. Layer 0 is
        # dense, the others MoE with a shared expert. llama_4_scaling (read by vLLM, ignored
        # by transformers) scales queries from position 16 on: a tensor argument that vLLM
        # passes to every decoder layer.
        common.pop("head_dim")
        common.update(num_key_value_heads=_NUM_HEADS)
        return (transformers.DeepseekV2Config(
            kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=32, v_head_dim=32,
            q_lora_rank=None, n_routed_experts=_EXPERTS,
            n_shared_experts=1, first_k_dense_replace=1, topk_method="greedy", n_group=1,
            topk_group=1,
            llama_4_scaling={"original_max_position_embeddings": 16, "beta": 0.5},
            **experts, **common), "DeepseekV2ForCausalLM")
    if arch == "qwen3_next":
        # Gated delta-net (linear attention, recurrent state) on even layers, full attention
        # on odd ones; vLLM's CPU kernels need head dims of 128 there and bfloat16.
        common.update(head_dim=128, num_attention_heads=2, num_key_value_heads=1)
        return (transformers.Qwen3NextConfig(
            linear_key_head_dim=128, linear_value_head_dim=128, linear_num_key_heads=1,
            linear_num_value_heads=2, num_experts=_EXPERTS,
            shared_expert_intermediate_size=hidden_size // 2,
            layer_types=["linear_attention" if i % 2 == 0 else "full_attention"
                         for i in range(num_layers)], **experts, **common),
                "Qwen3NextForCausalLM")
    raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {TINY_ARCHS}")


def _tiny_config(arch: str, num_layers: int, hidden_size: int, vocab_size: int, init_std: float, special: dict):
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=_NUM_HEADS,
        num_key_value_heads=_NUM_KV_HEADS,
        head_dim=_HEAD_DIM,
        max_position_embeddings=_MAX_POS,
        tie_word_embeddings=arch in _ALWAYS_TIED,
        initializer_range=init_std,
        **special,
    )
    return (_dense_config(arch, common, hidden_size)
            or _reasoning_config(arch, common, num_layers, hidden_size))


def _perturb(model, norm_std: float) -> None:
    """Embeddings with std 0.02; norm weights, attention sinks and expert biases made to
    matter (transformers starts them at ones or zeros, or tiny)."""
    import torch

    model.get_input_embeddings().weight.normal_(0.0, _EMBED_STD)
    for name, param in model.named_parameters():
        if param.ndim == 1 and "norm" in name and norm_std:
            param.add_(torch.randn_like(param) * norm_std)
        elif name.endswith(".sinks"):
            param.normal_(0.0, 1.0)
        elif name.endswith("_proj_bias"):  # gpt-oss experts
            param.normal_(0.0, 0.1)


def make_tiny_model(
    path: _PathLike,
    arch: str = "llama",
    num_layers: int = 4,
    hidden_size: int = 64,
    seed: int = 0,
    dtype=None,
    *,
    init_std: float = 0.1,
    norm_std: float = 0.1,
    extra_special_tokens: tuple[str, ...] = (),
) -> pathlib.Path:
    """Write a tiny randomly initialised ``arch`` model that vLLM can load into ``path``.

    ``arch`` is one of :data:`TINY_ARCHS`.  The model uses the SmolLM2
    tokenizer (copied from :func:`telltale_norm.models.default_model_dir`, which
    converts SmolLM2 first if needed), so its vocabulary is the tokenizer's (49152).

    Shapes: ``num_layers`` layers, 4 attention heads and 2 KV heads of size 32
    (the smallest head size vLLM's CPU attention supports; qwen2 and phi3,
    whose head size vLLM takes to be ``hidden_size / heads``, get
    ``hidden_size // 32`` heads and half as many KV heads instead),
    intermediate size ``2 * hidden_size``, 2048 positions.  Gemma 2/3 tie
    lm_head to the embeddings (vLLM requires it); the others have their own.
    The mixture-of-experts families have 4 experts of width ``hidden_size / 2``,
    2 per token; deepseek_v2 has MLA attention (latent rank 512, RoPE dims 64)
    and qwen3_next 2 full-attention heads of size 128 and gated delta-net
    layers (see ``_reasoning_config`` for each family's choices).

    Initialisation, deterministic in ``seed`` (under ``torch.manual_seed``; the
    caller's RNG state is restored afterwards): transformers' initialiser with
    std ``init_std`` (0.1 instead of transformers' 0.02, so the layers change
    the residual stream substantially), then embeddings re-drawn with std 0.02
    and RMSNorm weights perturbed by N(0, ``norm_std``) noise, so a norm
    implementation that ignored its weight would give visibly different
    results (``norm_std=0`` keeps the defaults); gpt-oss attention sinks are
    drawn with std 1 and its expert biases with std 0.1.  As a result
    hidden-state norms vary from token to token and greedy decoding yields
    varied, prompt-dependent tokens rather than repeating one token.

    ``dtype`` (a name or a ``torch.dtype``) is the dtype the weights are saved
    in and the config's ``dtype``; by default float32, bfloat16 for qwen3_next
    (vLLM's CPU kernels for its linear attention need it).  ``extra_special_tokens``
    (e.g. ``("<think>", "</think>")``, for reasoning-span tests) are added to the
    tokenizer as special tokens, at the end of the vocabulary.  Returns ``path``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from telltale_norm.models import default_model_dir

    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {TINY_ARCHS}")
    dtype = _DEFAULT_DTYPE.get(arch, "float32") if dtype is None else dtype
    torch_dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(torch_dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch dtype or its name, got {dtype!r}")

    path = pathlib.Path(path)
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    if extra_special_tokens:
        tokenizer.add_tokens(list(extra_special_tokens), special_tokens=True)
    special = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config, architecture = _tiny_config(arch, num_layers, hidden_size, len(tokenizer), init_std, special)
    config.architectures = [architecture]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():
            _perturb(model, norm_std)
    if config.tie_word_embeddings:
        model.tie_weights()
    model = model.to(torch_dtype).eval()
    model.config.dtype = torch_dtype
    model.generation_config = GenerationConfig(**special)

    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
