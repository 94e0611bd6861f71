"""docs/quickstart.md works as written: every ```bash block runs, in order, in one shell, on the embedded default.

The first block sets up the environment these tests already run in (scripts/setup_upstream_env.sh, which CI
runs through scripts/run_tests.sh before this tier); it is checked, not re-run, because re-running it here
could rebuild the venv under the running interpreter. The other blocks run verbatim in a temporary directory
that links the repository's scripts/, so every output goes there.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.upstream

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "docs" / "quickstart.md"


def bash_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```$", markdown, flags=re.S | re.M)


def test_quickstart_has_four_steps_and_the_setup_block_is_what_ci_runs():
    text = QUICKSTART.read_text()
    assert [h for h in re.findall(r"^## (\d)\. ", text, flags=re.M)] == ["1", "2", "3", "4"]
    setup = bash_blocks(text)[0]
    command = setup.splitlines()[0].split("#")[0].strip()
    assert command == "bash scripts/setup_upstream_env.sh"
    assert command in (REPO / "scripts" / "run_tests.sh").read_text()
    default_venv = re.search(r'VENV="\$\{INDEXTTS_LORA_UPSTREAM_VENV:-\$HOME/([^}]*)\}"',
                             (REPO / "scripts" / "setup_upstream_env.sh").read_text()).group(1)
    assert f"PY=$HOME/{default_venv}/bin/python" in setup


def test_every_quickstart_command_runs(tmp_path):
    blocks = bash_blocks(QUICKSTART.read_text())
    assert len(blocks) >= 4
    for name in ("scripts", "configs", "examples"):
        (tmp_path / name).symlink_to(REPO / name)
    script = "set -euo pipefail\n" + f"PY={sys.executable}\n" + "\n".join(blocks[1:])
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "2"}
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=400)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    out = tmp_path / "runs" / "quickstart"
    for produced in ("alice/adapter.safetensors", "alice/adapter_best.safetensors", "alice/metrics.jsonl",
                     "deploy/gpt_alice.pth", "deploy/config.yaml", "deploy/gpt_alice.pth.LICENSE.txt",
                     "hello_alice.wav"):
        assert (out / produced).is_file(), f"the quickstart did not produce {produced}"
    # The numbers the page quotes come from this run.
    assert "train 10, val 2, rejected 0" in log
    assert "[train] done at step 30" in log
