"""SmolLM2's GGUF -> a bfloat16 Hugging Face directory, checked against the source model.

`models.default_model_dir` runs it once per cache directory; this module knows nothing of the
cache. It needs torch and transformers, imported when a conversion runs.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import pathlib

logger = logging.getLogger(__name__)

# Written into a finished conversion's marker; bump it whenever the conversion changes, so
# stale caches get rebuilt.
FORMAT_VERSION = 1


def round_float32_artifact(x: float) -> float:
    """GGUF stores floats as float32 (1e-5 -> 9.9999997e-06); undo that."""
    if not x:
        return x
    rounded = float(f"{x:.7g}")
    return rounded if math.isclose(rounded, x, rel_tol=1e-6) else x


def convert_smollm2(gguf_path: pathlib.Path, out_dir: pathlib.Path) -> dict:
    """Convert the GGUF into ``out_dir`` (must exist and be empty); return marker info."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src_dir, gguf_file = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf_file)
    src = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=gguf_file, dtype=torch.float32)
    src.eval()

    embed = src.get_input_embeddings().weight
    head = src.get_output_embeddings().weight
    # SmolLM2 ties lm_head to the embeddings (the GGUF has no output.weight).  vLLM
    # only creates lm_head from the embeddings when the config says so, and only
    # reads lm_head.weight from the checkpoint otherwise; keep the two consistent.
    tied = head.data_ptr() == embed.data_ptr() or torch.equal(head, embed)

    config = copy.deepcopy(src.config)
    config.architectures = ["LlamaForCausalLM"]
    config.tie_word_embeddings = tied
    config.rms_norm_eps = round_float32_artifact(config.rms_norm_eps)
    config.dtype = torch.bfloat16
    # Anything the GGUF loader may have attached that is not part of a plain checkpoint.
    for attr in ("quantization_config", "gguf_file"):
        if hasattr(config, attr):
            delattr(config, attr)
    config._name_or_path = ""

    # Built on the meta device (no pointless random init of 135M parameters); every
    # weight is then taken over from the GGUF model, and the non-persistent buffers
    # (rotary frequencies) copied, so nothing is left uninitialised.
    with torch.device("meta"):
        fresh = LlamaForCausalLM(config)
    state = src.state_dict()
    if tied:
        state.pop("lm_head.weight", None)
    missing, unexpected = fresh.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(
            f"SmolLM2 GGUF does not match LlamaForCausalLM: missing={missing}, unexpected={unexpected}"
        )
    if tied:
        fresh.tie_weights()
    src_buffers = dict(src.named_buffers())
    for name, buf in list(fresh.named_buffers()):
        if buf.is_meta:
            owner, _, attr = name.rpartition(".")
            setattr(fresh.get_submodule(owner), attr, src_buffers[name].clone())
    still_meta = [n for n, t in [*fresh.named_parameters(), *fresh.named_buffers()] if t.is_meta]
    if still_meta:
        raise RuntimeError(f"conversion left tensors uninitialised: {still_meta}")
    fresh = fresh.to(torch.bfloat16).eval()
    fresh.generation_config = copy.deepcopy(src.generation_config)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(fresh.generation_config, key, None) is None:
            setattr(fresh.generation_config, key, getattr(config, key, None))

    fresh.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)

    verify_conversion(src, tokenizer, out_dir, tied)
    return {
        "format_version": FORMAT_VERSION,
        "source": str(gguf_path),
        "source_size": gguf_path.stat().st_size,
        "tie_word_embeddings": tied,
        "dtype": "bfloat16",
    }


def verify_conversion(src, tokenizer, out_dir: pathlib.Path, tied: bool) -> None:
    """Check the written directory against the source model before publishing it."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = json.loads((out_dir / "config.json").read_text())
    if bool(cfg.get("tie_word_embeddings")) != tied:
        raise RuntimeError(f"converted config has tie_word_embeddings={cfg.get('tie_word_embeddings')}, expected {tied}")
    with safe_open(str(out_dir / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        embed = f.get_tensor("model.embed_tokens.weight")
    if tied == ("lm_head.weight" in keys):
        raise RuntimeError("converted checkpoint's lm_head.weight does not match tie_word_embeddings")
    if embed.dtype != torch.bfloat16:
        raise RuntimeError(f"converted embeddings are {embed.dtype}, expected bfloat16")
    src_embed = src.get_input_embeddings().weight.detach()
    if not torch.equal(embed, src_embed.to(torch.bfloat16)):
        raise RuntimeError("converted embeddings differ from the GGUF's")

    tok = AutoTokenizer.from_pretrained(out_dir)
    if tok.chat_template != tokenizer.chat_template or len(tok) != len(tokenizer):
        raise RuntimeError("saved tokenizer lost its chat template or vocabulary")

    # End-to-end: the re-loaded model (bf16 weights, computed in float32 for speed)
    # must predict like the source, which fails if lm_head were random or mis-tied.
    out = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    if (out.get_output_embeddings().weight.data_ptr() == out.get_input_embeddings().weight.data_ptr()) != tied:
        raise RuntimeError("re-loaded model's lm_head tying differs from the source")
    ids = tokenizer("The capital of France is Paris, and the capital of Italy is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = src(ids).logits.float()
        got = out(ids).logits.float()
    cos = torch.nn.functional.cosine_similarity(ref.flatten(), got.flatten(), dim=0).item()
    agree = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    logger.debug("conversion check: logit cosine %.5f, top-1 agreement %.2f", cos, agree)
    if cos < 0.99 or agree < 0.7:
        raise RuntimeError(
            f"converted model disagrees with the GGUF (logit cosine {cos:.4f}, top-1 agreement {agree:.2f})"
        )
