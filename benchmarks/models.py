"""The benchmark model (IndexTTS2's GPT shape) and the same LoRA put on it by our engine and by PEFT.

Both sides get identical, random, non-zero A/B (drawn per module path and adapter), so that every timing
compares the same arithmetic.
"""
from __future__ import annotations

import copy
import zlib

import torch
from torch import nn
from transformers import GPT2Config, GPT2Model

from lora_engine import LoRASpec, inject_lora, lora_layers

OUR_TARGETS = ["h.*.attn.c_attn", "h.*.attn.c_proj", "h.*.mlp.c_fc", "h.*.mlp.c_proj"]
PEFT_TARGETS = ["c_attn", "c_proj", "c_fc"]  # PEFT matches name suffixes: c_proj covers attn.c_proj and mlp.c_proj
ALPHA_PER_RANK = 2.0  # alpha = 2 * rank, scale 2 (alpha 16 at r8)


def gpt_config(tiny: bool = False) -> GPT2Config:
    """UnifiedVoice's GPT: 1280 wide, 24 layers, 20 heads (tiny: a CPU smoke-test size). No dropout."""
    size = dict(n_embd=64, n_layer=2, n_head=4) if tiny else dict(n_embd=1280, n_layer=24, n_head=20)
    return GPT2Config(**size, vocab_size=256, n_positions=1024, bos_token_id=0, eos_token_id=0,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa")


def build_base(cfg: GPT2Config, device: str, dtype: torch.dtype, seed: int = 0) -> GPT2Model:
    """A frozen GPT2Model with random weights (GPT-2 init, never zero)."""
    torch.manual_seed(seed)
    model = GPT2Model(cfg).to(device=device, dtype=dtype)
    model.requires_grad_(False)
    return model


def lora_values(path: str, adapter: str, rank: int, in_dim: int, out_dim: int, seed: int = 0):
    """Deterministic random A [rank, in], B [out, rank] for one module path and adapter (fp32, CPU)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(f"{path}/{adapter}".encode()))
    A = torch.randn(rank, in_dim, generator=g) / in_dim ** 0.5
    B = torch.randn(out_dim, rank, generator=g) * 0.02
    return A, B


def add_ours(model: nn.Module, adapters: list[str], rank: int = 8) -> nn.Module:
    """Inject our LoRA (one or more named adapters) and fill them with `lora_values`."""
    spec = LoRASpec(target_modules=OUR_TARGETS, rank=rank, alpha=ALPHA_PER_RANK * rank, dropout=0.0)
    for name in adapters:
        inject_lora(model, spec, adapter=name)
    with torch.no_grad():
        for path, layer in lora_layers(model).items():
            for name in adapters:
                A, B = lora_values(path, name, rank, layer.in_dim, layer.out_dim)
                layer.lora_A[name].copy_(A)
                layer.lora_B[name].copy_(B)
    return model


def add_peft(model: nn.Module, adapters: list[str], rank: int = 8) -> nn.Module:
    """The same adapters through PEFT (fan_in_fan_out for transformers Conv1D)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=ALPHA_PER_RANK * rank, target_modules=PEFT_TARGETS, lora_dropout=0.0,
                     fan_in_fan_out=True)
    peft_model = get_peft_model(model, cfg, adapter_name=adapters[0])
    for name in adapters[1:]:
        peft_model.add_adapter(name, copy.deepcopy(cfg))
    with torch.no_grad():
        for mpath, module in peft_model.named_modules():
            if not hasattr(module, "lora_A") or not isinstance(module.lora_A, nn.ModuleDict):
                continue
            path = mpath.removeprefix("base_model.model.")
            for name in adapters:
                lin_A, lin_B = module.lora_A[name], module.lora_B[name]
                A, B = lora_values(path, name, rank, lin_A.in_features, lin_B.out_features)
                lin_A.weight.copy_(A)
                lin_B.weight.copy_(B)
    peft_model.base_model.set_adapter(adapters[0])
    return peft_model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]
