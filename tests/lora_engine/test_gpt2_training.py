"""Training through the engine on a real transformers GPT2Model (the Conv1D class IndexTTS2's GPT uses)."""
import torch
import torch.nn.functional as F

from lora_engine import LoRASpec, inject_lora, lora_layers, merge, unmerge
from tests.lora_engine.helpers import tiny_gpt2

TARGETS = ["h.*.attn.c_attn", "h.*.attn.c_proj", "h.*.mlp.c_fc", "h.*.mlp.c_proj"]


def _lm_loss(model, ids):
    hidden = model(ids[:, :-1]).last_hidden_state
    logits = hidden @ model.wte.weight.t()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def test_gradients_reach_lora_parameters_only():
    model = tiny_gpt2().train()
    inject_lora(model, LoRASpec(TARGETS, rank=4), "a")
    ids = torch.randint(0, 64, (3, 12))
    _lm_loss(model, ids).backward()
    for name, p in model.named_parameters():
        if ".lora_" in name:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None, name
    # B starts at zero, so A gets no gradient at step 0 but B must.
    assert all(layer.lora_B["a"].grad.abs().sum() > 0 for layer in lora_layers(model).values())


def test_a_few_adamw_steps_reduce_the_loss_and_merge_keeps_it():
    model = tiny_gpt2(n_embd=48).train()
    inject_lora(model, LoRASpec(TARGETS, rank=8, alpha=16), "a")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    ids, target = torch.randint(0, 64, (4, 13)), torch.randn(4, 13, 48)

    def loss_fn():
        return F.mse_loss(model(ids).last_hidden_state, target)

    first = loss_fn().item()
    for _ in range(40):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        trained = loss_fn().item()
        merge(model)
        merged = loss_fn().item()
        unmerge(model)
    assert trained < 0.6 * first
    assert abs(merged - trained) < 1e-4


def test_bf16_autocast_training_step_runs_and_matches_fp32_direction():
    model = tiny_gpt2().train()
    inject_lora(model, LoRASpec(TARGETS, rank=4), "a")
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B["a"].normal_(0, 0.1)
    ids = torch.randint(0, 64, (2, 10))
    _lm_loss(model, ids).backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _lm_loss(model, ids)
    loss.backward()
    for n, p in model.named_parameters():
        if n in ref:
            assert p.grad.dtype == torch.float32
            cos = F.cosine_similarity(p.grad.flatten(), ref[n].flatten(), dim=0)
            assert cos > 0.98, (n, cos)
