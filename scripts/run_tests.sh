#!/usr/bin/env bash
# Set up both test tiers (cached between runs) and run the whole test suite.
#   core tier:     CPU torch 2.13 + latest transformers (+ peft as an interoperability counterpart)
#   upstream tier: torch 2.8 + torchaudio 2.8 + transformers 4.52.1 + indextts2-cli 1.0.2 (the real UnifiedVoice)
# Extra arguments go to both pytest runs (e.g. -x, -k name).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Run a set-up script, show its output on stderr, print the VENV=<path> it reports. (`tee /dev/stderr` would
# reopen a redirected log file and truncate it.)
venv_of() {
  local log
  log=$(mktemp)
  "$@" | tee "$log" >&2
  sed -n 's/^VENV=//p' "$log" | tail -n 1
  rm -f "$log"
}

CORE=$(venv_of bash scripts/setup_core_env.sh)
echo "== core tier =="
"$CORE/bin/python" -m pytest -q -m "not upstream" --ignore=tests/indextts_integration "$@" tests  # that folder is the upstream tier

UPSTREAM=$(venv_of bash scripts/setup_upstream_env.sh)
echo "== upstream IndexTTS2 tier =="
set +e
"$UPSTREAM/bin/python" -m pytest -q -m upstream "$@" tests/indextts_integration
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "(no upstream-tier tests collected)"; rc=0; fi
exit "$rc"
