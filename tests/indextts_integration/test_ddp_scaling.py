"""benchmarks/ddp_scaling.py on the CPU: the IndexTTS2 task under torchrun with 2 gloo processes trains the same
adapter as one process with gradient accumulation (the task's loss calls UnifiedVoice's submodules directly, which
a bare DistributedDataParallel(model) would not see), and the report holds every figure it promises."""
from __future__ import annotations

import json

import pytest

from benchmarks import ddp_scaling

pytestmark = pytest.mark.upstream


def test_two_processes_match_one_with_accumulation_and_the_report_is_complete(tmp_path):
    out = tmp_path / "ddp"
    res = ddp_scaling.main(["--tiny", "--device", "cpu", "--amp", "none", "--gpus", "1", "2", "--steps", "4",
                            "--warmup", "1", "--batch-size", "2", "--examples", "12", "--work", str(tmp_path / "w"),
                            "--out", str(out)])
    eq = res["equivalence"]
    # fp32: halving each rank's gradient before the sum is exact, so the two runs agree to the last bits
    assert eq["worst_rel_diff"] < 1e-6 and eq["max_loss_diff"] < 1e-6 and eq["passed"]
    assert eq["one_gpu_half_batch_rel_diff"] > 1e-2  # the comparison can tell a different global batch apart
    assert [r["gpus"] for r in res["runs"]] == [1, 2] and [r["global_batch"] for r in res["runs"]] == [2, 4]
    for r in res["runs"]:
        assert r["timed_steps"] == 3 and r["step_time_ms"] > 0 and r["samples_per_s"] > 0
    assert res["runs"][0]["scaling_efficiency"] == pytest.approx(1.0)
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["runs"] == res["runs"] and "NCCL_NVLS_ENABLE" in saved["nccl_env"]
    table = out.with_suffix(".md").read_text()
    assert "| 2 | 4 |" in table and "pass" in table
    assert out.with_suffix(".png").stat().st_size > 1000
