#!/usr/bin/env bash
# The README's first command: set up (or reuse) the upstream IndexTTS2 venv, then run the whole pipeline on the
# embedded tiny checkpoint (scripts/demo.py) with that venv's python. Nothing is downloaded but Python packages
# (and Debian's espeak-ng, for the demo voices).
#   bash scripts/run_demo.sh [--output-dir runs/demo] [--steps 40] [--device cpu] [--skip-audio]
# Arguments go to scripts/demo.py (see its --help); relative paths are relative to where you run this.
# First run: ~5 minutes of set-up (torch 2.8 + IndexTTS2); later runs reuse the venv. The demo itself takes
# about a minute on a 2-core CPU.
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"

if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "error: $PYTHON not found. Install Python 3.10 or 3.11 (IndexTTS2's package needs < 3.12; Debian/Ubuntu: apt-get install python3 python3-venv)," \
       "or point PYTHON=/path/to/python3 at one." >&2
  exit 1
fi
if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
  echo "error: $PYTHON cannot create virtual environments (the venv/ensurepip modules are missing)." \
       "Debian/Ubuntu: apt-get install python3-venv; then run this again." >&2
  exit 1
fi

SETUP_LOG="$(mktemp)"
trap 'rm -f "$SETUP_LOG"' EXIT
echo "== setting up the IndexTTS2 environment (cached after the first run) =="
PYTHON="$PYTHON" bash "$REPO_DIR/scripts/setup_upstream_env.sh" | tee "$SETUP_LOG"
VENV="$(sed -n 's/^VENV=//p' "$SETUP_LOG" | tail -n 1)"
if [ -z "$VENV" ] || [ ! -x "$VENV/bin/python" ]; then
  echo "error: scripts/setup_upstream_env.sh did not report a usable venv (no VENV=<path> line); see its output above." >&2
  exit 1
fi

echo "== running the demo pipeline with $VENV/bin/python =="
"$VENV/bin/python" "$REPO_DIR/scripts/demo.py" "$@"
