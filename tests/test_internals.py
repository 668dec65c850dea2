"""The table of vLLM internals the adapter relies on, and the version policy built on it."""

from __future__ import annotations

import logging
import types

import pytest

from telltale_norm.vllm_adapter import internals
from telltale_norm.vllm_adapter.plugin import check_vllm_version


def test_every_internal_is_present_in_the_installed_vllm():
    problems = {i.describe(): why for i, why in internals.report() if why is not None}
    assert problems == {}
    assert len(internals.INTERNALS) >= 20


def test_a_changed_signature_fails_naming_the_internal_and_its_feature():
    entry = internals.BY_NAME["GPUModelRunner.execute_model"]

    class GPUModelRunner:
        def execute_model(self, batch, intermediate_tensors=None):
            return None

    module = types.ModuleType(entry.module)
    module.GPUModelRunner = GPUModelRunner
    assert internals.problem(entry, module) == "takes (batch, intermediate_tensors)"
    del GPUModelRunner.execute_model
    assert internals.problem(entry, module) == "missing"


def test_missing_fields_are_named():
    entry = internals.BY_NAME["InputBatch"]
    module = types.ModuleType(entry.module)

    class InputBatch:
        def __init__(self):
            self.num_prompt_tokens = None

        @property
        def req_ids(self):
            return []

    module.InputBatch = InputBatch
    assert internals.problem(entry, module) == "has no num_reqs, num_computed_tokens_cpu"


def test_require_raises_with_what_to_do(monkeypatch):
    entry = internals.BY_NAME["get_forward_context"]
    monkeypatch.setattr(internals, "_CHECKED", set())
    fake = types.ModuleType(entry.module)
    with pytest.raises(internals.VllmInternalsError) as err:
        internals.require("get_forward_context", fake)
    message = str(err.value)
    assert "vllm.forward_context.get_forward_context(...)" in message
    assert "loop re-runs" in message and "missing" in message and "0.33.x" in message


@pytest.mark.parametrize("version", ["0.32.0+cpu", "0.32.4", "0.33.0", "0.33.2+cu129"])
def test_tested_versions_run_quietly(version, caplog):
    with caplog.at_level(logging.WARNING, logger="vllm.telltale_norm"):
        check_vllm_version(version, strict=False)
        check_vllm_version(version, strict=True)
    assert caplog.records == []


def test_other_versions_warn_once_or_are_refused_when_strict(caplog):
    with caplog.at_level(logging.WARNING, logger="vllm.telltale_norm"):
        check_vllm_version("0.34.1", strict=False)
        check_vllm_version("0.34.1", strict=False)
    assert len(caplog.records) == 1 and "0.34.1 is untested" in caplog.text
    with pytest.raises(RuntimeError, match="TELLTALE_STRICT_VLLM=1 refuses untested"):
        check_vllm_version("0.31.0", strict=True)
