"""Rerank rows from the worker to the frontend, with each step's outputs (`push.py`).

- Worker (`GPUModelRunner.sample_tokens`, after vLLM's per-step synchronisation): the
  runtime's payload for the step rides on the ModelRunnerOutput as the attribute
  `telltale_push`. With tensor or pipeline parallel only the output rank's ModelRunnerOutput
  reaches the scheduler; every rank computes the same payload, so nothing is lost.
- Engine core (`Scheduler.update_from_output`): each request's payload is put into its
  EngineCoreOutput of the same step, under the key `telltale_norm` of `kv_transfer_params`,
  which vLLM already carries to the frontend (from every data-parallel engine). A KV
  connector's own parameters stay beside it; the frontend removes the key before vLLM
  reads the dict (`outputs.py`).
"""

from __future__ import annotations

from typing import Any

from telltale_norm.push import KEY
from telltale_norm.runtime import TelltaleRuntime
from telltale_norm.vllm_adapter import internals

PUSH_FIELD = "telltale_push"


def attach_push(runtime: TelltaleRuntime, output: Any) -> Any:
    """`output` (a ModelRunnerOutput) carrying the step's payload; returns the output."""
    index = getattr(output, "req_id_to_index", None)
    if index is None:  # not a sampled step's output (e.g. an earlier pipeline stage)
        runtime.take_push(lambda req_id: False)
        return output
    sampled = output.sampled_token_ids

    def has_output(req_id: str) -> bool:
        i = index.get(req_id)
        return i is not None and len(sampled[i]) > 0

    payload = runtime.take_push(has_output)
    # A payload needs a request with an output this step, so `output` is never vLLM's
    # shared empty ModelRunnerOutput (no requests); the check keeps it that way.
    if payload and index:
        setattr(output, PUSH_FIELD, payload)
    return output


def _update_from_output(original):
    def update_from_output(self, scheduler_output, model_runner_output, *args, **kwargs):
        outputs = original(self, scheduler_output, model_runner_output, *args, **kwargs)
        payload = getattr(model_runner_output, PUSH_FIELD, None)
        if payload:
            for batch in outputs.values():
                for out in batch.outputs:
                    mine = payload.get(out.request_id)
                    if mine is not None:
                        out.kv_transfer_params = {**(out.kv_transfer_params or {}), KEY: mine}
        return outputs

    return update_from_output


def install() -> None:
    """Patch the scheduler in the engine-core processes (one per data-parallel engine)."""
    internals.when_imported("EngineCoreOutput", lambda cls: None)  # checked on import
    internals.patch("Scheduler.update_from_output", _update_from_output)
