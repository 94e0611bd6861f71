#!/usr/bin/env bash
# Set up (or reuse) the core tier venv: CPU torch 2.13 + latest transformers + our package with its dev extras.
# Idempotent: a stamp holding the hash of pyproject.toml marks a finished venv.
# Usage: bash scripts/setup_core_env.sh   (prints VENV=<path> on its last line)
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${INDEXTTS_LORA_CORE_VENV:-$REPO_DIR/.venv}"
PYTHON="${PYTHON:-python3}"
TORCH="${INDEXTTS_LORA_TORCH:-torch==2.13.0}"  # the CPU wheel on this kind of machine; any torch >= 2.1 works
STAMP="$VENV/.indextts-lora-stamp"
HASH=$( (cat "$REPO_DIR/pyproject.toml"; echo "$TORCH") | sha256sum | cut -c1-16)
START=$(date +%s)

quiet_pip() { grep -v "is ignored: it is neither a file nor a directory" || true; }

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ] && [ -x "$VENV/bin/python" ]; then
  echo "Reusing core venv $VENV."
  PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/pip" install -q --no-deps --no-build-isolation -e "$REPO_DIR" \
    2> >(quiet_pip >&2)
else
  echo "Creating core venv at $VENV ..."
  "$PYTHON" -m venv "$VENV"
  export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
  # torch first and pinned: a bare `torch` requirement would pull the multi-GB CUDA build.
  "$VENV/bin/pip" install -q "$TORCH" 2> >(quiet_pip >&2)
  "$VENV/bin/pip" install -q -e "$REPO_DIR[dev]" 2> >(quiet_pip >&2)
  echo "$HASH" > "$STAMP"
fi
"$VENV/bin/python" -c "import torch, transformers, lora_engine; print(f'core tier OK (torch {torch.__version__}, transformers {transformers.__version__})')"
echo "Core tier set up in $(( $(date +%s) - START )) s."
echo "VENV=$VENV"
