"""The GPU run's `--check` training check (benchmarks/checks.py) on the CPU: after fused-AdamW steps the fast path's
training and no-grad forwards equal the reference path's with the same parameters (stale cached factors were 0.3
off before the optimizer step count joined the cache keys)."""
from benchmarks.checks import check_training_steps


def test_fast_path_follows_fused_adamw_steps_on_a_gpt2():
    line = check_training_steps("cpu")  # asserts inside: error < 2e-2 and the steps moved the output > 0.2
    assert line.startswith("6 fused-AdamW steps")
