"""Every vLLM internal the adapter relies on, in one table, checked where it is first used.

vLLM has no stable plugin API for what telltale-norm does, so the adapter patches and reads
internals. Instead of trusting a version number, each internal is checked once, when its
module is imported (or, for instance attributes, when the object first reaches us): it
must exist and, for callables, take the expected leading parameters. A failed check stops
the process with an error naming the internal and the feature that needs it.
`telltale-norm doctor` prints the table with one OK/FAIL line per entry.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from telltale_norm.vllm_adapter.patching import on_import, patch_method

TESTED_VLLM = ("0.32", "0.33")  # major.minor versions the test suite and the table cover


class VllmInternalsError(RuntimeError):
    """A vLLM internal the adapter needs is missing or has another shape."""


@dataclass(frozen=True)
class Internal:
    """One vLLM internal: where it lives, what shape it must have, and who needs it."""

    module: str
    name: str  # "Class", "Class.method", "function"
    feature: str
    params: tuple[str, ...] | None = None  # leading parameters of a callable (after self)
    fields: tuple[str, ...] = ()  # dataclass fields, or attributes of an instance

    def describe(self) -> str:
        shape = (f"({', '.join((*self.params, '...'))})" if self.params is not None
                 else f" [{', '.join(self.fields)}]" if self.fields else "")
        return f"{self.module}.{self.name}{shape}"


_ENGINE = "vllm.engine.arg_utils"
_INPUT = "vllm.v1.engine.input_processor"
_RUNNER = "vllm.v1.worker.gpu_model_runner"
_OUTPUT = "vllm.v1.engine.output_processor"
_COMPLETION = "vllm.entrypoints.openai.completion.serving"
_CHAT = "vllm.entrypoints.openai.chat_completion.serving"
INTERNALS: tuple[Internal, ...] = (
    Internal(_ENGINE, "EngineArgs.create_engine_config", "engine start: settings, GPU checks",
             params=()),
    Internal("vllm.config.vllm", "VllmConfig.compute_hash", "compile once per graph",
             params=("include_version",)),
    Internal(_INPUT, "InputProcessor._validate_params", "per-request settings (HTTP 400)",
             params=("params",)),
    Internal(_INPUT, "InputProcessor.process_inputs", "prefix-cache salt of editing requests",
             params=("request_id", "prompt", "params")),
    Internal("vllm.entrypoints.llm", "LLM.generate", "VLLM_PATCH_DUMP_EVERY",
             params=("prompts", "sampling_params")),
    Internal("vllm.entrypoints.llm", "LLM.collective_rpc", "stats, traces",
             params=("method", "timeout", "args")),
    Internal(_INPUT, "InputProcessor.tokenizer", "telltale_span: reasoning delimiters"),
    Internal("vllm.sampling_params", "SamplingParams", "server-side best-of (n = k inside)",
             fields=("n", "temperature", "output_kind", "extra_args")),
    Internal(_COMPLETION, "OpenAIServingCompletion.request_output_to_completion_response",
             "LRS annotations: completions", params=("final_res_batch", "request")),
    Internal(_COMPLETION, "OpenAIServingCompletion.completion_stream_generator",
             "LRS annotations: streamed completions",
             params=("request", "engine_inputs", "result_generator")),
    Internal(_CHAT, "OpenAIServingChat.chat_completion_full_generator",
             "LRS annotations: chat completions", params=("request", "result_generator")),
    Internal(_CHAT, "OpenAIServingChat.chat_completion_stream_generator",
             "LRS annotations: streamed chat completions",
             params=("request", "result_generator")),
    Internal("vllm.v1.engine.core_client", "AsyncMPClient.call_utility_all_async",
             "GET /telltale/stats: every data-parallel engine", params=("method",)),
    Internal(_OUTPUT, "OutputProcessor.__init__", "RERANK_SPAN delimiters checked at start",
             params=("tokenizer",)),
    Internal(_OUTPUT, "OutputProcessor.process_outputs", "LRS rows received with outputs",
             params=("engine_core_outputs",)),
    Internal(_OUTPUT, "OutputProcessor", "LRS rows received with outputs",
             fields=("request_states", "tokenizer")),
    Internal(_OUTPUT, "RequestState._new_completion_output", "LRS scores on final outputs",
             params=("token_ids", "finish_reason", "stop_reason")),
    Internal(_OUTPUT, "RequestState", "LRS scores on final outputs",
             fields=("request_id", "parent_req", "prompt_token_ids", "detokenizer")),
    Internal("vllm.v1.engine.parallel_sampling", "ParentRequest.get_outputs",
             "LRS selection among n candidates, best-of", params=("child_request_id",
                                                                  "completion_output")),
    Internal("vllm.v1.engine.parallel_sampling", "ParentRequest",
             "LRS selection among n candidates, best-of", fields=("sampling_params",)),
    Internal("vllm.v1.engine", "EngineCoreOutput", "LRS rows to the frontend",
             fields=("request_id", "kv_transfer_params")),
    Internal("vllm.v1.core.sched.scheduler", "Scheduler.update_from_output",
             "LRS rows into each request's output (every data-parallel engine)",
             params=("scheduler_output", "model_runner_output")),
    Internal("vllm.exceptions", "VLLMValidationError", "HTTP 400 for bad request settings"),
    Internal("vllm.config", "ParallelConfig", "statistics per data-parallel engine",
             fields=("data_parallel_index",)),
    Internal("vllm.config", "CompilationMode", "compilation and CUDA-graph checks",
             fields=("NONE", "VLLM_COMPILE")),
    Internal("vllm.config", "CUDAGraphMode", "compilation and CUDA-graph checks",
             fields=("NONE", "PIECEWISE")),
    Internal(_RUNNER, "GPUModelRunner.load_model", "wrap decoder layers after load",
             params=()),
    Internal(_RUNNER, "GPUModelRunner.execute_model", "free finished requests",
             params=("scheduler_output",)),
    Internal(_RUNNER, "GPUModelRunner._model_forward", "map each step's tokens to requests",
             params=("input_ids", "positions")),
    Internal(_RUNNER, "GPUModelRunner.sample_tokens", "LRS rows pushed with each step",
             params=("grammar_output",)),
    Internal("vllm.v1.outputs", "ModelRunnerOutput", "LRS rows pushed with each step",
             fields=("req_id_to_index", "sampled_token_ids")),
    Internal("vllm.v1.worker.cpu_model_runner", "CPUModelRunner.load_model",
             "wrap decoder layers after load (CPU)", params=()),
    Internal("vllm.v1.worker.worker_base", "WorkerBase", "statistics RPCs"),
    Internal("vllm.v1.core.sched.output", "SchedulerOutput", "finished requests, step sizes",
             fields=("num_scheduled_tokens", "finished_req_ids")),
    Internal("vllm.v1.worker.gpu_input_batch", "CachedRequestState", "per-request settings",
             fields=("sampling_params",)),
    Internal("vllm.v1.worker.gpu_input_batch", "InputBatch", "the step's batch order",
             fields=("req_ids", "num_reqs", "num_computed_tokens_cpu", "num_prompt_tokens")),
    Internal("vllm.forward_context", "get_forward_context", "loop re-runs without KV writes",
             params=()),
    Internal("vllm.forward_context", "ForwardContext", "loop re-runs without KV writes",
             fields=("slot_mapping",)),
    Internal("vllm.utils.torch_utils", "direct_register_custom_op", "the layer op",
             params=("op_name", "op_func", "mutates_args", "fake_impl", "target_lib")),
    Internal("vllm.distributed.parallel_state", "get_tp_group", "loop: the same re-runs on every TP rank",
             params=()),
    Internal("vllm.distributed.parallel_state", "get_world_group", "per-rank statistics files", params=()),
)
BY_NAME: dict[str, Internal] = {i.name: i for i in INTERNALS}
_CHECKED: set[str] = set()


def _lookup(module: ModuleType, name: str) -> Any:
    obj: Any = module
    for part in name.split("."):
        # the class's own attribute first, so a patched method is seen as vLLM defined it
        obj = vars(obj).get(part, getattr(obj, part)) if isinstance(obj, type) else getattr(
            obj, part)
    return getattr(obj, "_telltale_original", obj)


def problem(internal: Internal, module: ModuleType) -> str | None:
    """What is wrong with `internal` in the imported `module`, or None."""
    try:
        obj = _lookup(module, internal.name)
    except AttributeError:
        return "missing"
    if internal.params is not None:
        try:
            names = [p for p in inspect.signature(obj).parameters if p != "self"]
        except (TypeError, ValueError):
            return "not a callable with a signature"
        if tuple(names[:len(internal.params)]) != internal.params:
            return f"takes ({', '.join(names)})"
    if internal.fields and isinstance(obj, type):
        known = ({f.name for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj)
                 else set(dir(obj)) | set(inspect.signature(obj).parameters)
                 | _assigned_attributes(obj))
        missing = [f for f in internal.fields if f not in known]
        if missing:
            return f"has no {', '.join(missing)}"
    return None


def _assigned_attributes(cls: type) -> set[str]:
    """`self.x = ...` names in `cls.__init__` (instance attributes dir() cannot see)."""
    try:
        source = inspect.getsource(cls.__init__)
    except (OSError, TypeError):
        return set()
    return {line.split("self.", 1)[1].split("=")[0].split(":")[0].strip()
            for line in source.splitlines() if line.strip().startswith("self.") and "=" in line}


def _fail(internal: Internal, why: str) -> VllmInternalsError:
    import vllm

    return VllmInternalsError(
        f"telltale-norm needs vLLM's {internal.describe()} for {internal.feature}, but in "
        f"vLLM {vllm.__version__} it is {why}. This vLLM is not supported; install a tested "
        f"one ({', '.join(v + '.x' for v in TESTED_VLLM)}) or unset VLLM_PATCH.")


def require(name: str, module: ModuleType | None = None) -> Any:
    """The internal `name`, checked once (its module imported if not given)."""
    internal = BY_NAME[name]
    module = module or importlib.import_module(internal.module)
    if name not in _CHECKED:
        why = problem(internal, module)
        if why is not None:
            raise _fail(internal, why)
        _CHECKED.add(name)
    return _lookup(module, name)


def patch(name: str, make: Callable[[Callable], Callable]) -> None:
    """Replace the method `name` of the table by `make(original)` once its module is
    imported, after checking it."""
    internal = BY_NAME[name]
    cls_name, method = internal.name.rsplit(".", 1)

    def apply(module: ModuleType) -> None:
        require(name, module)
        patch_method(getattr(module, cls_name), method, make)

    on_import(internal.module, apply)


def when_imported(name: str, callback: Callable[[Any], None]) -> None:
    """Call `callback(obj)` with the checked internal `name` once its module is imported."""
    internal = BY_NAME[name]
    on_import(internal.module, lambda module: callback(require(name, module)))


def report() -> list[tuple[Internal, str | None]]:
    """Every internal with its problem (None: OK), importing each module (for doctor)."""
    rows = []
    for internal in INTERNALS:
        try:
            module = importlib.import_module(internal.module)
        except Exception as err:  # noqa: BLE001 - any import failure is the answer
            rows.append((internal, f"its module does not import ({type(err).__name__})"))
            continue
        rows.append((internal, problem(internal, module)))
    return rows


def source_report(root: str) -> list[tuple[Internal, str | None]]:
    """Like `report`, read from the Python sources of a vLLM tree (`root/vllm/...`) that is
    not installed, e.g. an unpacked CUDA wheel: checks presence and parameters only."""
    import ast
    from pathlib import Path

    rows = []
    for internal in INTERNALS:
        path = Path(root, *internal.module.split("."))
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        try:
            tree = ast.parse(path.read_text())
        except OSError:
            rows.append((internal, f"no file {path}"))
            continue
        node: ast.AST | None = tree
        for part in internal.name.split("."):
            node = next((n for n in ast.iter_child_nodes(node) if getattr(n, "name", None)
                         == part), None) if node is not None else None
        if node is None:  # re-exported names (vllm.distributed, vllm.config) count as found
            imported = any(isinstance(n, ast.ImportFrom) and any(
                (a.asname or a.name) == internal.name for a in n.names) for n in ast.walk(tree))
            rows.append((internal, None if imported else "missing"))
            continue
        why = None
        if internal.params is not None and isinstance(node, (ast.FunctionDef,
                                                             ast.AsyncFunctionDef)):
            names = [a.arg for a in node.args.posonlyargs + node.args.args if a.arg != "self"]
            if tuple(names[:len(internal.params)]) != internal.params:
                why = f"takes ({', '.join(names)})"
        rows.append((internal, why))
    return rows
