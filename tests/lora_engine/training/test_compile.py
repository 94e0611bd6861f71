"""torch.compile: the LoRA layers trace without graph breaks, and --compile trains like eager."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from lora_engine import LoRASpec, inject_lora
from lora_engine.training import train
from lora_engine.training import synthetic

from .conftest import small_config


def _injected(dropout: float) -> torch.nn.Module:
    torch.manual_seed(0)
    model = synthetic.build_model()
    inject_lora(model, LoRASpec(synthetic.TARGETS, rank=4, alpha=8, dropout=dropout), adapter="default")
    return model.train()


def _breaks(explanation) -> str:
    return "; ".join(f"{r.reason} at {r.user_stack[-1] if r.user_stack else '?'}"
                     for r in explanation.break_reasons)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lora_layer_and_training_forward_have_no_graph_breaks(dropout: float) -> None:
    torch._dynamo.reset()
    model = _injected(dropout)
    layer = model.transformer.h[0].attn.c_attn
    x = torch.randn(2, 5, layer.in_dim, requires_grad=True)
    e = torch._dynamo.explain(layer)(x)
    assert e.graph_break_count == 0 and e.graph_count == 1, _breaks(e)

    torch._dynamo.reset()
    batch = synthetic.collate(synthetic.make_sequences(3, seed=0))
    e = torch._dynamo.explain(synthetic.loss_fn)(model, batch)
    assert e.graph_break_count == 0, _breaks(e)


def test_compile_flag_trains_like_eager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Inductor's C++ codegen takes ~50 s on 2 cores; aot_eager runs the same dynamo + AOTAutograd capture of
    # forward and backward, and fullgraph=True turns any graph break into an error.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager", fullgraph=True))
    torch._dynamo.reset()
    manifest = tmp_path / "fixed_length.jsonl"  # one sequence length: one graph, no dynamic-shape recompiles
    seqs = [s[:12] for s in synthetic.make_sequences(64, seed=1) if len(s) >= 12]
    manifest.write_text("".join(json.dumps({"tokens": s}) + "\n" for s in seqs))
    kw = dict(max_steps=3, save_every=0, eval_every=0, train_manifests=[str(manifest)],
              val_manifests=[str(manifest)])
    compiled = train(small_config(tmp_path / "compiled", compile=True, **kw))
    eager = train(small_config(tmp_path / "eager", **kw))
    assert compiled.step == eager.step == 3
    assert compiled.loss == pytest.approx(eager.loss, rel=1e-4)
    assert compiled.val_loss == pytest.approx(eager.val_loss, rel=1e-4)
