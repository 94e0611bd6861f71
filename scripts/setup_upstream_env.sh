#!/usr/bin/env bash
# Set up (or reuse) the upstream IndexTTS2 tier venv: torch 2.8 + transformers 4.52.1 + indextts2-cli (--no-deps).
# Idempotent and cached: a stamp file holding the hash of the requirements below marks a finished venv.
# Usage: bash scripts/setup_upstream_env.sh   (prints the venv path on its last line: VENV=<path>)
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${INDEXTTS_LORA_UPSTREAM_VENV:-$HOME/.cache/indextts-lora/venv-upstream}"
PYTHON="${PYTHON:-python3}"
START=$(date +%s)

# Everything upstream's imports need (indextts2-cli itself goes in with --no-deps: its own pins pull CUDA-only
# packages such as deepspeed/flash-attn that cannot build here).
REQUIREMENTS=(
  "torch==2.8.0" "torchaudio==2.8.0" "transformers==4.52.1" "einops"
  "sentencepiece" "librosa" "json5" "omegaconf" "munch" "matplotlib" "modelscope" "WeTextProcessing"
  "soundfile" "safetensors" "pyyaml" "tqdm" "numpy" "pytest" "hypothesis" "tensorboard"
  "setuptools>=68" "wheel"  # for the editable install of our package without build isolation
  # s2mel imports indextts.s2mel.dac, which imports descript-audiotools (installed --no-deps below: its
  # protobuf<3.20 pin breaks tensorboard); these are the modules its import actually needs.
  "flatten-dict" "julius" "ffmpy" "rich" "pyloudnorm" "randomname" "argbind" "markdown2" "importlib-resources"
)
UPSTREAM_PKG="indextts2-cli==1.0.2"
NO_DEPS_PKGS=("$UPSTREAM_PKG" "descript-audiotools==0.7.2")
REQ_HASH=$(printf '%s\n' "${REQUIREMENTS[@]}" "${NO_DEPS_PKGS[@]}" "$($PYTHON -c 'import sys; print(sys.version_info[:2])')" \
  | sha256sum | cut -c1-16)
STAMP="$VENV/.indextts-lora-stamp"

quiet_pip() {
  # The local mirrors' find-links make pip print one harmless "is ignored" warning per package: drop those.
  grep -v "is ignored: it is neither a file nor a directory" || true
}

install_espeak() {
  # Debian espeak-ng gives the demo dataset real speech; failure only degrades the demo, so warn and go on.
  if command -v espeak-ng >/dev/null 2>&1; then return 0; fi
  local SUDO=""
  if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
      echo "WARNING: espeak-ng missing and not root; demo data will fall back to generated audio." >&2; return 0; fi
  fi
  echo "Installing espeak-ng via apt-get ..."
  if ! ( $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq espeak-ng ) >/dev/null 2>&1; then
    echo "WARNING: could not install espeak-ng; demo data will fall back to generated audio." >&2
  fi
}

install_espeak

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$REQ_HASH" ] && [ -x "$VENV/bin/python" ]; then
  echo "Reusing upstream venv (stamp $REQ_HASH matches)."
else
  echo "Creating upstream venv at $VENV ..."
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  "$PYTHON" -m venv "$VENV"
  export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
  # One resolver call for all dependencies: the fastest path.
  "$VENV/bin/pip" install -q "${REQUIREMENTS[@]}" 2> >(quiet_pip >&2)
  "$VENV/bin/pip" install -q --no-deps "${NO_DEPS_PKGS[@]}" 2> >(quiet_pip >&2)
  echo "$REQ_HASH" > "$STAMP"
fi

# Our own package, editable, without deps (they are all above); cheap, so done on every run (the repo may move).
PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/pip" install -q --no-deps --no-build-isolation -e "$REPO_DIR" \
  2> >(quiet_pip >&2)

# Smoke check: the upstream modules our integration imports must load on CPU.
"$VENV/bin/python" - <<'PY'
import importlib
for name in ("indextts.gpt.model_v2", "indextts.infer_v2", "indextts.utils.front", "indextts.utils.maskgct_utils",
             "indextts.s2mel.modules.length_regulator", "indextts.s2mel.modules.flow_matching",
             "indextts.s2mel.modules.campplus.DTDNN", "indextts.s2mel.modules.bigvgan.bigvgan"):
    importlib.import_module(name)
from indextts.gpt.model_v2 import UnifiedVoice  # noqa: F401
import torch, transformers
print(f"upstream imports OK (torch {torch.__version__}, transformers {transformers.__version__})")
PY

echo "Upstream tier set up in $(( $(date +%s) - START )) s."
echo "VENV=$VENV"
