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


def test_compiled_training_fuses_the_up_projections_and_matches_eager_gradients():
    """Under torch.compile the LoRA up-projections of a training layer (y += h B^T, dx += u A) are rank-1 terms
    fused by Inductor, not GEMMs (compiled_op.py); the compiled loss and LoRA gradients agree with the eager fast
    path's to bf16 rounding."""
    import copy

    from torch._dynamo.backends.common import aot_autograd

    torch.manual_seed(0)
    eager = frozen_mlp_with_lora((16, 32, 8))
    for name, p in eager.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # B = 0 would make every A gradient zero
    compiled_model = copy.deepcopy(eager)
    x = torch.randn(3, 16)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def step(model, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x).float().square().mean()
    torch._dynamo.reset()
    got = torch.compile(lambda x: step(compiled_model, x), backend=aot_autograd(fw_compiler=record,
                                                                               bw_compiler=record))(x)
    got.backward()
    gemms = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}
    count = sum(n.target in gemms for g in graphs for n in g.graph.nodes)
    # two layers x (base forward, h = x A^T, u = dy B, dA, dB) + the second layer's dx (the input of the first
    # needs no gradient); traced as GEMMs the up-projections would add 3 more
    assert len(graphs) == 2 and count == 2 * 5 + 1, [str(n.target) for g in graphs for n in g.graph.nodes]
    for p in compiled_model.parameters():
        p.grad = None
    torch._dynamo.reset()
    got = torch.compile(lambda x: step(compiled_model, x))(x)  # Inductor
    want = step(eager, x)
    got.backward()
    want.backward()
    assert torch.allclose(got, want, rtol=2e-2)
    params = dict(compiled_model.named_parameters())
    grads = [(n, p.grad, params[n].grad) for n, p in eager.named_parameters() if "lora_" in n]
    assert len(grads) == 4 and all(g is not None and g.abs().max() > 0 for _, g, _ in grads)
    for name, g_eager, g_compiled in grads:
        assert torch.allclose(g_eager, g_compiled, rtol=2e-2, atol=2e-2 * g_eager.abs().max()), name
