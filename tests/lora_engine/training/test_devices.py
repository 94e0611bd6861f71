"""Device choice and the AMP recipe per device type."""
from __future__ import annotations

import pytest
import torch

from lora_engine.training.devices import amp_recipe, pick_device


def test_amp_recipes() -> None:
    cpu = torch.device("cpu")
    assert amp_recipe(cpu, "auto").dtype is None
    assert amp_recipe(cpu, "none").name == "none" and not amp_recipe(cpu, "none").use_scaler
    assert amp_recipe(cpu, "bf16").dtype is torch.bfloat16 and not amp_recipe(cpu, "bf16").use_scaler
    assert amp_recipe(cpu, "fp16").dtype is torch.float16 and amp_recipe(cpu, "fp16").use_scaler
    assert amp_recipe(torch.device("mps"), "auto").name == "fp16"
    assert amp_recipe(torch.device("xpu"), "auto").name == "bf16"
    with pytest.raises(ValueError, match="amp must be one of"):
        amp_recipe(cpu, "int8")
    with amp_recipe(cpu, "bf16").autocast():
        y = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype is torch.bfloat16
    assert amp_recipe(cpu, "fp16").grad_scaler().is_enabled()
    assert not amp_recipe(cpu, "bf16").grad_scaler().is_enabled()


def test_pick_device() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    auto = pick_device("auto")
    assert auto.type == ("cuda" if torch.cuda.is_available() else auto.type)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="--device auto"):
            pick_device("cuda")
    else:
        assert pick_device("cuda", 0) == torch.device("cuda", 0)


def test_training_attention_leaves_out_cudnn_on_cuda_only() -> None:
    from lora_engine.training.devices import training_attention

    before = torch.backends.cuda.cudnn_sdp_enabled()
    with training_attention(torch.device("cuda")):  # only sets torch's backend flags: runs without a GPU
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
    with training_attention(torch.device("cpu")):
        assert torch.backends.cuda.cudnn_sdp_enabled() == before
