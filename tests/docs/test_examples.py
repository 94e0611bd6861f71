"""Every example in examples/ runs on its own on CPU and passes its own check (exit code 0, prints OK).

The IndexTTS2 example needs the upstream tier; it runs in tests/indextts_integration/test_examples_upstream.py.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("[0-9][0-9]_*.py"))
UPSTREAM_ONLY = {"07_indextts2_adapter_and_live_blend.py"}
CORE = [p for p in EXAMPLES if p.name not in UPSTREAM_ONLY]


def run_example(path: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, str(path), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_examples_exist_and_every_one_is_run_somewhere():
    names = {p.name for p in EXAMPLES}
    assert len(names) >= 7 and UPSTREAM_ONLY <= names
    for p in EXAMPLES:
        text = p.read_text()
        assert text.startswith('"""') and "sys.exit(0 if ok else 1)" in text, f"{p.name}: docstring and exit code"


@pytest.mark.parametrize("path", CORE, ids=[p.stem for p in CORE])
def test_example_runs_and_passes_its_check(path):
    result = run_example(path)
    assert result.returncode == 0, f"{path.name} failed:\n{result.stdout}\n{result.stderr}"
    assert result.stdout.rstrip().splitlines()[-1] == "OK"
