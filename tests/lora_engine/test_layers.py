"""Forward of every wrapper against a float64 reference: unmerged, blended, per-row blended, merged."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lora_engine import LoRASpec, inject_lora, lora_layers, merge, set_blend, unmerge
from tests.lora_engine.helpers import TOL, Stack, randomize_lora, reference_layer

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
KINDS = {"emb": "emb", "lin": "lin", "conv": "conv"}


def _input(kind: str, batch: int, seq: int, model: Stack, dtype) -> torch.Tensor:
    if kind == "emb":
        return torch.randint(0, model.emb.num_embeddings, (batch, seq))
    dim = model.lin.in_features if kind == "lin" else model.conv.weight.shape[0]
    return torch.randn(batch, seq, dim, dtype=dtype)


def _model(kind, ranks, dtype, use_rslora=False):
    model = Stack().to(dtype)
    for i, r in enumerate(ranks):
        inject_lora(model, LoRASpec([kind], rank=r, alpha=2.0 * r + i, use_rslora=use_rslora), f"a{i}")
    randomize_lora(model)
    return model, lora_layers(model)[kind]


def _close(got, want, dtype):
    scale = want.abs().max().item() + 1.0
    err = (got.double() - want).abs().max().item()
    assert err <= TOL[dtype] * scale, f"max error {err:.3g} vs scale {scale:.3g} in {dtype}"


@given(kind=st.sampled_from(list(KINDS)), dtype=st.sampled_from(DTYPES),
       ranks=st.lists(st.integers(1, 6), min_size=1, max_size=4),
       per_row=st.booleans(), batch=st.integers(1, 4), seq=st.integers(1, 5), rslora=st.booleans(),
       seed=st.integers(0, 2**16))
def test_blend_matches_float64_reference(kind, dtype, ranks, per_row, batch, seq, rslora, seed):
    torch.manual_seed(seed)
    model, layer = _model(kind, ranks, dtype, rslora)
    names = layer.adapters
    weights = {n: (torch.rand(batch) * 2 - 0.5 if per_row and i % 2 == 0 else 1.5 - i * 0.4)
               for i, n in enumerate(names)}
    set_blend(model, weights)
    x = _input(kind, batch, seq, model, dtype)
    with torch.no_grad():
        got = layer(x)
    assert got.dtype == dtype
    _close(got, reference_layer(layer, x, weights), dtype)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_merged_forward_matches_unmerged_and_reference(kind, dtype):
    model, layer = _model(kind, [3, 5], dtype)
    weights = {"a0": 0.7, "a1": -0.4}
    set_blend(model, weights)
    x = _input(kind, 2, 4, model, dtype)
    with torch.no_grad():
        unmerged = layer(x)
        merge(model)
        merged = layer(x)
        unmerge(model)
    ref = reference_layer(layer, x, weights)
    _close(unmerged, ref, dtype)
    _close(merged, ref, dtype)


@pytest.mark.parametrize("kind", list(KINDS))
def test_empty_blend_is_exactly_the_base(kind):
    model = Stack()
    x = _input(kind, 2, 3, model, torch.float32)
    base = getattr(model, kind)(x)
    inject_lora(model, LoRASpec([kind], rank=4), "a")
    randomize_lora(model)
    set_blend(model, {})
    assert torch.equal(lora_layers(model)[kind](x), base)
    set_blend(model, {"a": 1.0})
    assert not torch.allclose(lora_layers(model)[kind](x), base)


def test_blend_is_one_gemm_pair_over_stacked_rank():
    """Four blended adapters cost the same number of matmuls as one (no per-adapter GEMM chain)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountMM(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] in ("mm", "addmm", "addmm_", "bmm"):
                self.n += 1
            return func(*args, **(kwargs or {}))

    model, layer = _model("lin", [2, 3, 4, 5], torch.float32)
    x = torch.randn(2, 3, 12)
    counts = []
    for weights in ({"a0": 1.0}, {"a0": 0.1, "a1": 0.2, "a2": 0.3, "a3": 0.4}):
        set_blend(model, weights)
        with torch.no_grad(), CountMM() as c:
            layer(x)
        counts.append(c.n)
    assert counts[0] == counts[1] == 3  # base, x A^T, accumulate (.) B^T


def test_per_row_weight_length_must_match_batch():
    model, layer = _model("lin", [2, 2], torch.float32)
    set_blend(model, {"a0": torch.tensor([1.0, 0.0, 0.5]), "a1": 0.5})
    with pytest.raises(ValueError, match="per-row"):
        layer(torch.randn(2, 4, 12))


@pytest.mark.parametrize("bad", [{"zz": 1.0}, {"a0": float("nan")}, {"a0": torch.ones(2, 2)},
                                 {"a0": torch.ones(2), "a1": torch.ones(3)}])
def test_set_blend_refuses_bad_weights(bad):
    model, layer = _model("lin", [2, 2], torch.float32)
    with pytest.raises((KeyError, ValueError)):
        set_blend(model, bad)
    assert layer.blend == {"a1": 1.0}  # unchanged: the last injected adapter alone
