"""The LoRA layers trace into one torch.compile graph: no graph break per layer (each one cost a 2.6x slower
compiled training step on the GPU, benchmarks/NOTES.md (12))."""
import torch
from torch import nn

from lora_engine import LoRASpec, inject_lora, lora_layers
from lora_engine import functional as Fn


def test_training_forward_has_no_graph_break_and_matches_eager():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    model.requires_grad_(False)
    inject_lora(model, LoRASpec(["0", "2"], rank=4, alpha=8), "v")
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B["v"].normal_(0, 0.2)
    x = torch.randn(3, 16)

    def step(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x).float().square().mean()
    explained = torch._dynamo.explain(step)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager")
    got, want = compiled(x), step(x)
    assert torch.allclose(got, want, rtol=1e-2), (got, want)


def test_autocast_availability_is_asked_once_per_device_type(monkeypatch):
    calls = []
    real = torch.amp.is_autocast_available
    monkeypatch.setattr(Fn, "_AUTOCAST_AVAILABLE", {})
    monkeypatch.setattr(torch.amp, "is_autocast_available", lambda dev: calls.append(dev) or real(dev))
    x = torch.randn(2, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert Fn.compute_dtype(x) == torch.bfloat16
        assert Fn.compute_dtype(x) == torch.bfloat16
    assert Fn.compute_dtype(x) == torch.float32
    assert calls == ["cpu"]
