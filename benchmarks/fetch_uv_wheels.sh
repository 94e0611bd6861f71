#!/usr/bin/env bash
# Download the wheels the UnifiedVoice memory row needs beside the GPU machine's own torch/transformers 5:
# upstream IndexTTS2 (indextts2-cli, which pins transformers 4.52.1) and the transformers 4.52.1 stack, for the
# GPU machine's Python (3.12 by default). The GPU machine has no network: run this where PyPI is reachable, carry
# the folder, then `python benchmarks/run_all.py --only unifiedvoice --uv-site DIR` unpacks them into a temporary
# site directory (no install). The wheels hold upstream code and are never committed.
# Usage: bash benchmarks/fetch_uv_wheels.sh [DIR] [PYTHON_VERSION]   (defaults: uv_wheels 3.12)
set -euo pipefail
DIR="${1:-uv_wheels}"
PYV="${2:-3.12}"
mkdir -p "$DIR"
# transformers 4.52.1 refuses tokenizers >= 0.22 and huggingface_hub >= 1.0 at import: pin what it accepts.
pip download -q --no-deps -d "$DIR" --python-version "$PYV" --platform manylinux2014_x86_64 --only-binary=:all: \
  "transformers==4.52.1" "tokenizers==0.21.4" "huggingface_hub==0.36.2"
# indextts2-cli declares Requires-Python < 3.12 but is pure Python and imports on 3.12: fetch it for this Python.
pip download -q --no-deps -d "$DIR" "indextts2-cli==1.0.2"
ls -1 "$DIR"
