"""Fresh interpreters for tests: plain vLLM scripts and `vllm serve`, each in its own process
group with a clean telltale environment, so the real `vllm.general_plugins` loading is what
is tested (no harness state leaks in)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).parent / "scripts" / "generate.py"
# Every variable that could carry settings from the test process into a child.
TELLTALE_VARS = frozenset({
    "VLLM_PATCH", "VLLM_PLUGINS", "PATCHED_LAYERS", "PATCHED_TAU_JSON", "ADAPTIVE",
    "VLLM_PATCH_STATE_PATH", "VLLM_PATCH_Q", "VLLM_PATCH_STATS_PATH", "VLLM_PATCH_DUMP_EVERY",
    "VLLM_PATCH_TRACE", "LOOP_MAX_EXTRA", "PYTHONPATH"})


def clean_env(**update: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in TELLTALE_VARS}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.update(update)
    return env


def start_script(model: Path | str, env: dict[str, str], max_tokens: int,
                 dtype: str = "float32") -> subprocess.Popen:
    """tests/scripts/generate.py (a plain vLLM script) in a fresh interpreter."""
    return subprocess.Popen([sys.executable, str(SCRIPT), str(model), "--max-tokens",
                             str(max_tokens), "--dtype", dtype], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str, str]:
    """(exit code, stdout, stderr); the process group is killed if it overruns."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    return proc.returncode, out, err


def script_tokens(out: str) -> list[list[int]]:
    lines = [line for line in out.splitlines() if line.startswith("TOKENS ")]
    assert lines, f"no TOKENS line in the script's output:\n{out[-3000:]}"
    return json.loads(lines[-1][len("TOKENS "):])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, timeout: float = 300,
         headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """(HTTP status, decoded JSON body); error statuses are returned, not raised."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json",
                                              **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


class VllmServer:
    """`vllm serve MODEL` on 127.0.0.1 (its own port and process group, eager, fp32)."""

    def __init__(self, model: Path | str, env: dict[str, str], log: Path,
                 args: tuple[str, ...] = ()) -> None:
        self.model = str(model)
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = log
        cmd = [str(Path(sys.executable).parent / "vllm"), "serve", self.model,
               "--host", "127.0.0.1", "--port", self.url.rsplit(":", 1)[1],
               "--enforce-eager", "--dtype", "float32", "--max-model-len", "512", "--seed", "0",
               # an explicit KV size skips the CPU worker's check that
               # --gpu-memory-utilization of the RAM is free (a loaded machine may not have it)
               "--gpu-memory-utilization", "0.2", "--kv-cache-memory-bytes", str(256 << 20),
               *args]
        with log.open("w") as sink:
            self.proc = subprocess.Popen(cmd, env=clean_env(**env), cwd=REPO, stdout=sink,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 900) -> None:
        deadline = time.monotonic() + timeout  # a loaded 2-core machine starts slowly
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1)
        raise TimeoutError(f"vllm serve not ready after {timeout} s:\n{self.tail()}")

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def stop(self) -> None:
        """SIGTERM to the group (the server and its engine processes), SIGKILL if it lingers."""
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        except ProcessLookupError:
            pass
        try:  # engine processes left behind in the group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def complete(self, prompt: str | list[str], xargs: dict | None = None,
                 max_tokens: int = 16, **extra: Any) -> tuple[int, Any]:
        """A greedy `/v1/completions` request (any field overridable by `extra`)."""
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens,
                "temperature": 0.0, "ignore_eos": True, "return_token_ids": True, **extra}
        if xargs is not None:
            body["vllm_xargs"] = xargs
        return post(self.url + "/v1/completions", body)
