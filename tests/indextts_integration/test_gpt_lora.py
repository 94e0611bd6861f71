"""LoRA on the real upstream UnifiedVoice (tiny, random weights): targets, loss, training, merged gpt.pth."""
import pytest

pytest.importorskip("indextts.gpt.model_v2", reason="upstream tier: needs indextts2-cli (scripts/setup_upstream_env.sh)")

import torch  # noqa: E402

from indextts_integration import model_dir as md  # noqa: E402
from indextts_integration.deploy import merged_state_dict, write_merged_gpt  # noqa: E402
from indextts_integration.gpt_loss import (GPTBatch, fix_gradient_checkpointing, gpt_forward,  # noqa: E402
                                           set_gpt_dropout)
from indextts_integration.targets import preset_targets  # noqa: E402
from indextts_integration.tiny_checkpoint import make_tiny_checkpoint  # noqa: E402
from lora_engine import LoRASpec, inject_lora, lora_layers, merge, save_adapter, set_blend, unmerge  # noqa: E402

pytestmark = pytest.mark.upstream


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_ckpt"), seed=0)


def _model(tiny_dir):
    torch.manual_seed(0)
    return md.load_unified_voice(tiny_dir)


def _batch(model, B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    D = model.model_dim
    text_lengths = torch.tensor([7, 4, 6][:B])
    code_lengths = torch.tensor([20, 13, 17][:B])
    return GPTBatch(conditioning=torch.randn(B, 32, D, generator=g), emo_vec=0.1 * torch.randn(B, D, generator=g),
                    text_ids=torch.randint(2, model.number_text_tokens, (B, 7), generator=g), text_lengths=text_lengths,
                    codes=torch.randint(0, 8192, (B, 20), generator=g), code_lengths=code_lengths)


def _randomize(model, std=0.05):
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for p in [*layer.lora_A.values(), *layer.lora_B.values()]:
                p.normal_(0, std)


@pytest.mark.parametrize("preset,per_block", [("gpt-attn-mlp", 4), ("gpt-attn", 2)])
def test_presets_hit_exactly_the_gpt_blocks(tiny_dir, preset, per_block):
    model = _model(tiny_dir)
    names = inject_lora(model, LoRASpec(preset_targets(preset), rank=4), "v")
    assert len(names) == per_block * model.layers
    assert all(n.startswith("gpt.h.") for n in names)
    heads = inject_lora(model, LoRASpec(preset_targets("gpt-attn+heads+embeddings"), rank=2), "w")
    assert set(heads) - set(names) == {"text_head", "mel_head", "text_embedding", "mel_embedding"}


def test_unmerged_equals_merged_equals_merged_gpt_pth(tiny_dir, tmp_path):
    model = _model(tiny_dir).eval()
    inject_lora(model, LoRASpec(preset_targets("gpt-attn-mlp+heads"), rank=4, alpha=8), "alice")
    _randomize(model)
    save_adapter(model, tmp_path / "alice.safetensors", adapter="alice")
    batch = _batch(model)
    with torch.no_grad():
        base_loss = None
        set_blend(model, {})
        base_loss = gpt_forward(model, batch).loss
        set_blend(model, {"alice": 1.0})
        unmerged = gpt_forward(model, batch)
        merge(model)
        merged = gpt_forward(model, batch)
        unmerge(model)
    out = write_merged_gpt(tiny_dir, [(tmp_path / "alice.safetensors", 1.0)], tmp_path / "gpt_alice.pth",
                           write_config=True)
    fresh = md.build_unified_voice(md.load_config(tiny_dir)).eval()
    fresh.load_state_dict(torch.load(out, weights_only=True), strict=True)  # what stock IndexTTS2 does
    with torch.no_grad():
        from_file = gpt_forward(fresh, batch)
    assert abs(unmerged.loss - base_loss) > 1e-3  # the adapter really changes the model
    torch.testing.assert_close(merged.loss, unmerged.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(from_file.loss, unmerged.loss, atol=1e-5, rtol=1e-5)
    assert (tmp_path / "config.yaml").read_text().count("gpt_alice.pth") == 1
    assert "Derivative Work" in (tmp_path / "gpt_alice.pth.LICENSE.txt").read_text()


def test_merged_file_changes_only_targeted_tensors(tiny_dir, tmp_path):
    model = _model(tiny_dir)
    inject_lora(model, LoRASpec(preset_targets("gpt-attn"), rank=2), "v")
    _randomize(model)
    original = md.load_gpt_state_dict(tiny_dir)
    merged = merged_state_dict(model, list(original), {"v": 1.0})
    changed = {k for k in original if not torch.equal(original[k], merged[k])}
    assert changed == {f"gpt.h.{i}.attn.{m}.weight" for i in range(model.layers) for m in ("c_attn", "c_proj")}
    assert all(merged[k].dtype == original[k].dtype for k in original)


def test_upstream_checkpointing_starves_lora_and_the_fix_restores_gradients(tiny_dir):
    model = _model(tiny_dir).train()
    inject_lora(model, LoRASpec(preset_targets("gpt-attn-mlp"), rank=4), "v")
    _randomize(model)
    assert model.gpt.is_gradient_checkpointing  # upstream's constructor default
    # Reentrant checkpointing sees inputs that need no grad and cuts the graph: nothing reaches LoRA.
    assert not gpt_forward(model, _batch(model)).loss.requires_grad
    fix_gradient_checkpointing(model, enabled=True)
    gpt_forward(model, _batch(model)).loss.backward()
    fed = [p.grad for n, p in model.named_parameters() if ".lora_" in n]
    assert all(g is not None and g.abs().sum() > 0 for g in fed)
    assert all(p.grad is None for n, p in model.named_parameters() if ".lora_" not in n)


def test_a_short_training_run_lowers_the_loss(tiny_dir):
    model = _model(tiny_dir).train()
    fix_gradient_checkpointing(model, enabled=False)
    inject_lora(model, LoRASpec(preset_targets("gpt-attn-mlp"), rank=8, alpha=16), "v")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    batch = _batch(model)
    first = gpt_forward(model, batch).loss.item()
    for _ in range(25):
        opt.zero_grad()
        gpt_forward(model, batch).loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        out = gpt_forward(model, batch)
    assert out.loss.item() < 0.7 * first
    assert 0 < out.mel_correct <= out.mel_count


def test_padding_to_a_multiple_leaves_loss_and_gradients_unchanged(tiny_dir):
    model = _model(tiny_dir).double().train()
    fix_gradient_checkpointing(model, enabled=False)
    set_gpt_dropout(model, 0.0)  # upstream's 0.1 would draw different masks for the longer sequence
    inject_lora(model, LoRASpec(preset_targets("gpt-attn-mlp"), rank=4), "v")
    _randomize(model)
    batch = _batch(model)
    batch = GPTBatch(**{k: v.double() if v.is_floating_point() else v for k, v in vars(batch).items()})
    results = []
    for multiple in (0, 64):
        model.zero_grad()
        out = gpt_forward(model, batch, pad_to_multiple=multiple)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (plain, g0), (padded, g1) = results
    assert int(plain.mel_count) == int(padded.mel_count) and int(plain.mel_correct) == int(padded.mel_correct)
    torch.testing.assert_close(padded.loss, plain.loss, rtol=1e-12, atol=0)
    assert g0.keys() == g1.keys() and g0
    for n in g0:  # float64 model, but gpt_forward takes the cross-entropy in float32 (as in bf16 training)
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-6, atol=1e-10, msg=lambda m, n=n: f"{n}: {m}")


def test_padding_makes_the_length_a_multiple_within_the_mel_position_table(tiny_dir):
    from indextts_integration.gpt_loss import _pad_codes

    model = _model(tiny_dir)
    batch = _batch(model)
    padded = _pad_codes(model, batch, 64)
    assert (34 + 7 + 2 + padded.codes.shape[1] + 2) % 64 == 0 and padded.codes.shape[1] > batch.codes.shape[1]
    assert torch.equal(padded.codes[:, :20], batch.codes) and (padded.codes[:, 20:] == model.stop_mel_token).all()
    assert _pad_codes(model, batch, 1 << 20) is batch  # past max_mel_tokens: left as it is
