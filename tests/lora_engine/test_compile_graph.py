"""The LoRA layers trace into one torch.compile graph: no graph break per layer (each one cost a 2.6x slower
compiled training step on the GPU, benchmarks/NOTES.md (12))."""
import torch

from lora_engine import functional as Fn
from tests.lora_engine.helpers import frozen_mlp_with_lora


def test_training_forward_has_no_graph_break_and_matches_eager():
    model = frozen_mlp_with_lora((16, 32, 8))
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
