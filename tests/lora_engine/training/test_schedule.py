"""Warmup + cosine: values against the closed form, and the scheduler's state survives a checkpoint."""
from __future__ import annotations

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from lora_engine.training.schedule import WarmupCosine, warmup_cosine_scheduler


@given(warmup=st.integers(0, 50), total=st.integers(1, 500), floor=st.floats(0.0, 1.0))
def test_warmup_then_cosine_to_the_floor(warmup: int, total: int, floor: float) -> None:
    f = WarmupCosine(warmup, total, floor)
    for i in range(warmup):
        assert math.isclose(f(i), (i + 1) / (warmup + 1))
    if total > warmup:
        assert math.isclose(f(warmup), 1.0)
        mid = warmup + (total - warmup) / 2
        if mid.is_integer():
            assert math.isclose(f(int(mid)), floor + (1 - floor) / 2, abs_tol=1e-12)
        assert math.isclose(f(total), floor, abs_tol=1e-12)
        assert math.isclose(f(total + 1000), floor, abs_tol=1e-12)
    after = [f(i) for i in range(warmup, total + 3)]
    assert all(b <= a + 1e-12 for a, b in zip(after, after[1:]))


def test_scheduler_state_round_trip() -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1e-3)
    sched = warmup_cosine_scheduler(opt, 5, 40, 0.1)
    for _ in range(12):
        opt.step()
        sched.step()
    state, opt_state = sched.state_dict(), opt.state_dict()
    assert state["lr_lambdas"][0] == {"warmup_steps": 5, "total_steps": 40, "min_ratio": 0.1}

    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched2 = warmup_cosine_scheduler(opt2, 5, 40, 0.1)
    opt2.load_state_dict(opt_state)
    sched2.load_state_dict(state)
    for _ in range(10):
        assert sched2.get_last_lr() == sched.get_last_lr()
        opt.step(), sched.step(), opt2.step(), sched2.step()
    assert math.isclose(sched.get_last_lr()[0], 1e-3 * WarmupCosine(5, 40, 0.1)(22))
