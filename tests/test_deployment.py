"""GPU-default deployment settings: each one adapted for the plugin, or refused at engine start
with a message naming the setting. The engine config is built by vLLM's real
`EngineArgs.create_engine_config` with the plugin's patch; settings only a GPU engine can
take are checked on a real config with the CUDA path switched on (`deployment.adapt(...,
cuda=True)`)."""

from __future__ import annotations

import dataclasses

import pytest

from conftest import telltale_env
from telltale_norm.vllm_adapter.deployment import UnsupportedDeploymentError, adapt

MONITOR = {"VLLM_PATCH": "monitor", "PATCHED_LAYERS": "1,2"}


def engine_config(model, env=MONITOR, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    with telltale_env(env):
        return EngineArgs(model=str(model), dtype="float32", max_model_len=512,
                          **kwargs).create_engine_config()


@pytest.fixture(scope="module")
def llama(tiny_model):
    return tiny_model("llama")


def refused(model, match, env=MONITOR, **kwargs):
    with pytest.raises(UnsupportedDeploymentError, match=match) as err:
        engine_config(model, env, **kwargs)
    assert "unset VLLM_PATCH" in str(err.value)
    return str(err.value)


def test_async_scheduling_is_turned_off_unless_asked_for_then_refused(llama):
    assert engine_config(llama).scheduler_config.async_scheduling is False
    refused(llama, r"async scheduling \(--async-scheduling", async_scheduling=True)
    # an unpatched engine is left alone
    assert engine_config(llama, {}, async_scheduling=None) is not None


def test_speculative_decoding_is_refused_in_the_engine(llama):
    from vllm import LLM

    ngram = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}
    message = refused(llama, "speculative decoding", speculative_config=ngram)
    assert "--speculative-config" in message
    with telltale_env(MONITOR), pytest.raises(UnsupportedDeploymentError, match="draft"):
        LLM(model=str(llama), speculative_config=ngram, enforce_eager=True)


@pytest.mark.parametrize("kwargs, match", [
    ({"enable_dbo": True}, r"micro-batching \(enable_dbo=True"),
    ({"ubatch_size": 2}, r"micro-batching .*ubatch_size=2"),
    ({"watermark_config": {"key": 1}}, r"Model Runner V2 \(selected by watermark_config\)"),
])
def test_settings_the_plugin_cannot_follow_are_refused(llama, kwargs, match):
    refused(llama, match, **kwargs)


@pytest.mark.parametrize("env, match", [
    ({"VLLM_USE_V2_MODEL_RUNNER": "1"}, r"Model Runner V2 \(selected by VLLM_USE_V2_MODEL_RU"),
    ({"VLLM_USE_RUST_FRONTEND": "1"}, r"the Rust frontend \(VLLM_USE_RUST_FRONTEND=1\)"),
])
def test_environment_the_plugin_cannot_follow_is_refused(llama, env, match):
    refused(llama, match, {**MONITOR, **env})


@pytest.fixture()
def cuda_config(llama):
    """A real engine config as a default GPU engine would have it (compiled, full and
    piecewise CUDA graphs, vLLM's splitting ops)."""
    from vllm.config import CompilationMode, CUDAGraphMode

    config = engine_config(llama)
    cc = config.compilation_config
    cc.mode = CompilationMode.VLLM_COMPILE
    cc.cudagraph_mode = CUDAGraphMode.FULL_AND_PIECEWISE
    cc.splitting_ops = ["vllm::unified_attention", "vllm::unified_kv_cache_update"]
    return config


def test_cuda_graphs_stay_as_set_without_loop_and_piecewise_around_loops_op(cuda_config):
    from vllm.config import CUDAGraphMode

    vllm_ops = ["vllm::unified_attention", "vllm::unified_kv_cache_update"]
    cc = cuda_config.compilation_config
    adapt(cuda_config, loop_possible=False, cuda=True)  # the step is in the graph
    assert cc.cudagraph_mode == CUDAGraphMode.FULL_AND_PIECEWISE and cc.splitting_ops == vllm_ops
    adapt(cuda_config, loop_possible=True, cuda=True)
    assert cc.cudagraph_mode == CUDAGraphMode.PIECEWISE
    assert cc.splitting_ops == [*vllm_ops, "telltale::layer_step"]  # vLLM's own ops kept


@pytest.mark.parametrize("change, match", [
    ({"mode": "NONE"}, r"loop and CUDA graphs \(cudagraph_mode=FULL_AND_PIECEWISE\) without "
                       r"vLLM's compilation \(mode=NONE.*VLLM_USE_BREAKABLE_CUDAGRAPH=0"),
    ({"splitting_ops": []}, r"loop and splitting_ops=\[\]"),
])
def test_cuda_graph_settings_that_would_skip_loops_op_are_refused(cuda_config, change, match):
    from vllm.config import CompilationMode

    cc = cuda_config.compilation_config
    for name, value in change.items():
        setattr(cc, name, CompilationMode[value] if name == "mode" else value)
    adapt(cuda_config, loop_possible=False, cuda=True)  # no op: the step is graph-safe
    with pytest.raises(UnsupportedDeploymentError, match=match):
        adapt(cuda_config, loop_possible=True, cuda=True)


def test_without_cuda_graphs_any_compilation_mode_is_fine(cuda_config):
    from vllm.config import CompilationMode, CUDAGraphMode

    cc = cuda_config.compilation_config
    cc.mode, cc.cudagraph_mode = CompilationMode.NONE, CUDAGraphMode.NONE
    adapt(cuda_config, loop_possible=True, cuda=True)
    assert cc.cudagraph_mode == CUDAGraphMode.NONE


def test_sequence_parallel_moe_is_refused(cuda_config):
    parallel = dataclasses.replace(cuda_config.parallel_config)
    parallel.enable_expert_parallel = True
    parallel.all2all_backend = "allgather_reducescatter"
    parallel.tensor_parallel_size = parallel.data_parallel_size = 2
    assert parallel.use_sequence_parallel_moe  # vLLM's own rule
    cuda_config.parallel_config = parallel
    with pytest.raises(UnsupportedDeploymentError, match="sequence-parallel MoE"):
        adapt(cuda_config, loop_possible=False)


def test_compile_hash_keys_only_what_shapes_the_graph(llama):
    """vLLM keys its compile cache by the config hash: another tau, probability, seed or
    stats path must reuse the compiled graph; other layers, loop, bank shapes, or no plugin
    must not."""
    def key(**env):
        return engine_config(llama, {**MONITOR, **env}).compute_hash()

    base = key()
    assert key(VLLM_PATCH="suppress", PATCHED_TAU_JSON='{"1": 3, "2": 4}', TTTS_P_INJECT="0.7",
               VLLM_RANDOM_SEED="9", VLLM_PATCH_STATS_PATH="/tmp/s.json",
               ADAPTIVE_IQR_K="2", RERANK_METRIC="B") == base
    others = [key(PATCHED_LAYERS="1,3"), key(VLLM_PATCH="loop"), key(TTTS_BANK_K="8"),
              key(TTTS_REPLAY_LOG="4"), engine_config(llama, {}).compute_hash()]
    assert len({base, *others}) == len(others) + 1
    assert key(TELLTALE_ALLOW_LOOP="1") == key(VLLM_PATCH="loop")  # the same graph


def test_vllm_gpu_backend_split_keeps_the_compiled_once_step_in_its_pieces():
    """On a GPU, vLLM's backend splits the traced model at attention (`split_graph`); the
    step's nested compile region, called at every patched layer, must survive the split:
    each piece calls the one region body, and the split graph computes what the step does."""
    import numpy as np
    import torch
    from vllm.compilation.backends import split_graph

    from telltale_norm.config import TelltaleConfig
    from telltale_norm.runtime import TelltaleRuntime

    @torch.library.custom_op("telltale_test::attention", mutates_args=(),
                             schema="(Tensor x) -> Tensor")
    def attention(x):  # stands in for vLLM's attention op
        return x * 0.5

    attention.register_fake(lambda x: torch.empty_like(x))
    config = TelltaleConfig.from_env({"VLLM_PATCH": "suppress", "PATCHED_LAYERS": "1,2,3"})
    rt = TelltaleRuntime(config, num_layers=4, hidden_size=8, max_num_seqs=4)
    extra = {"telltale_tau_json": '{"1": 0, "2": 0, "3": 0}'}
    rt.begin_step(["a"], np.array([1]), np.array([5]), np.array([5]),
                  lambda rid: (extra, None, 0))

    def model(hidden, residual):
        for layer in (1, 2, 3):
            hidden = torch.ops.telltale_test.attention(hidden)
            hidden, residual, _ = rt.layer_step(layer, hidden, residual)
        return hidden

    pieces = {}

    def backend(gm, example_inputs):
        split_gm, items = split_graph(gm, ["telltale_test::attention"])
        for item in items:
            pieces[item.submod_name] = [
                node.args[0].target for node in item.graph.graph.nodes
                if node.target is torch.ops.higher_order.invoke_subgraph]
        return split_gm.forward

    hidden, residual = torch.randn(1, 8), torch.randn(1, 8)
    expect = model(hidden, residual)  # eager
    torch._dynamo.reset()
    got = torch.compile(model, backend=backend, fullgraph=True)(hidden, residual)
    bodies = [body for called in pieces.values() for body in called]
    assert len(bodies) == 3 and len(set(bodies)) == 1
    assert torch.equal(got, expect)
