"""The IndexTTS2 example runs in the upstream tier and passes its own checks (the others: tests/docs)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.upstream

REPO = Path(__file__).resolve().parents[2]


def test_indextts2_example_runs_on_the_tiny_checkpoint(tiny_ckpt):
    path = REPO / "examples" / "07_indextts2_adapter_and_live_blend.py"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "2"}
    result = subprocess.run([sys.executable, str(path), "--model-dir", str(tiny_ckpt)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    lines = result.stdout.rstrip().splitlines()
    assert lines[-1] == "OK"
    assert any(line.startswith("live 50/50 blend vs merged gpt.pth") for line in lines)
