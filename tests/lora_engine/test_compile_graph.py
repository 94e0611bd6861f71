"""The LoRA layers trace into one torch.compile graph: no graph break per layer (each one cost a 2.6x slower
compiled training step on the GPU, benchmarks/NOTES.md (12))."""
import pytest
import torch

from lora_engine import functional as Fn
from lora_engine import lora_layers
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


@pytest.mark.parametrize("form, kept, gemms", [("gemm", False, 2 * 8 - 2), ("rank1", False, 2 * 5 + 1),
                                               ("cat", False, 2 * 4), ("rank1", True, 2 * 4 + 1)])
def test_compiled_training_forms_trace_their_gemms_and_match_eager_gradients(form, kept, gemms):
    """Both forms torch.compile can see (compiled_op.py) trace into one forward and one backward graph with the
    cuBLAS calls their design says, and the compiled loss and LoRA gradients agree with the eager fast path's to
    bf16 rounding. Per layer: "gemm" runs base, h, y += h B^T forward and u, dx, dx += u A, dA, dB backward;
    "rank1" fuses the two up-projections into pointwise terms and runs dx as one GEMM; "cat" also takes h from the
    base GEMM and u from dx's (base, dA, dB forward and backward). The first layer's input needs no gradient (no dx:
    two GEMMs fewer in "gemm", one in "rank1"; in "cat" u is then a GEMM of its own). `kept`: "rank1" on the cast
    base train_casts.prepare keeps ([W; A_c]: h from the base GEMM, no cast of W in the graphs)."""
    import copy

    from torch._dynamo.backends.common import aot_autograd

    torch.manual_seed(0)
    eager = frozen_mlp_with_lora((16, 32, 8))
    for name, p in eager.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # B = 0 would make every A gradient zero
    compiled_model = copy.deepcopy(eager)
    for layer in lora_layers(compiled_model).values():
        layer.compiled_form = form
    if kept:
        from lora_engine import train_casts
        assert train_casts.prepare(compiled_model, torch.bfloat16) == 2
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
    ops = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}
    count = sum(n.target in ops for g in graphs for n in g.graph.nodes)
    assert len(graphs) == 2 and count == gemms, [str(n.target) for g in graphs for n in g.graph.nodes]
    casts = [n for n in graphs[0].graph.nodes if n.target == torch.ops.aten._to_copy.default
             and n.args[0].op == "placeholder" and tuple(n.args[0].meta["val"].shape) in ((32, 16), (8, 32))]
    assert (len(casts) == 0) == kept, [str(n) for n in casts]  # the casts of the weights: none when kept
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


def test_an_unknown_compiled_form_is_refused():
    from lora_engine import compiled_op

    x, w, A, B = torch.randn(3, 4), torch.randn(5, 4), torch.randn(2, 4, requires_grad=True), torch.randn(5, 2)
    with pytest.raises(ValueError, match="compiled_form must be one of"):
        compiled_op.lora_linear(x, w, None, A, B, torch.ones(2), "out_in", 1.0, form="fast")
