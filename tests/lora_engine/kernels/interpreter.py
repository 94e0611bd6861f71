"""Running a test script in a subprocess under Triton's CPU interpreter (triton reads TRITON_INTERPRET at import)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def run_interpreted(script: str, *args: str, timeout: int = 900) -> str:
    """Run `script` (python -c) with TRITON_INTERPRET=1 and the repository importable; it must exit 0 and print "ok"
    last. Returns its stdout."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stdout[-2000:] + p.stderr[-3000:]
    return p.stdout
