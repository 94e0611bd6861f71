"""benchmarks/tune_train.py end to end on the CPU (Triton's interpreter, tiny shapes): every fused output checked
against float64, a best tile per shape and pass, and the JSON that `run_all.py --train-tiles` reads."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lora_engine.kernels import lora_train_triton as lt

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(lt.triton is None, reason="triton is not importable")
def test_tune_train_tiny_checks_every_output_and_picks_tiles(tmp_path):
    out = tmp_path / "tune.json"
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tune_train.py"), "--tiny", "--out", str(out)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and "check: fused == float64 within 0.01 relative: PASS" in p.stdout, p.stdout + p.stderr
    res = json.loads(out.read_text())
    assert res["check_passed"] is True and len(res["core"]) == 4
    for row in res["core"].values():
        assert 0 < row["max_rel_err"] < 1e-2 and row["layer_fused"] > 0 and row["cublas_fwd"] > 0
    assert len(res["tuned"]) == 4
    for passes in res["tuned"].values():  # what run_all.py --train-tiles hands to lora_train_triton.set_config
        assert {w for w in passes if w in lt.DEFAULTS} == set(lt.DEFAULTS)
        assert all(set(passes[w]) == set(lt.DEFAULTS[w]) for w in lt.DEFAULTS)
