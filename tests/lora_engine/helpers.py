"""Test helpers: tiny models and the float64 reference the engine is compared against."""
from __future__ import annotations

import torch
from torch import nn
from transformers import GPT2Config, GPT2Model
from transformers.pytorch_utils import Conv1D

from lora_engine import LoRASpec, inject_lora, lora_layers

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float64: 1e-10}


def tiny_gpt2(n_layer: int = 2, n_embd: int = 32, seed: int = 0) -> GPT2Model:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=4, vocab_size=64, n_positions=32,
                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2Model(cfg).eval()


class Stack(nn.Module):
    """One of each supported base kind, to test all wrappers in one model."""

    def __init__(self, dim: int = 12, vocab: int = 20, out: int = 7):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.lin = nn.Linear(dim, dim)
        self.conv = Conv1D(out, dim)  # weight [dim, out]
        nn.init.normal_(self.conv.weight, std=0.3)
        nn.init.normal_(self.conv.bias, std=0.3)

    def forward(self, idx):
        return self.conv(torch.tanh(self.lin(self.emb(idx))))


def frozen_mlp_with_lora(dims: tuple[int, int, int] = (24, 40, 16), seed: int = 0) -> nn.Module:
    """Linear-GELU-Linear, frozen, with one rank-4 adapter "v" on both Linears whose B is random (non-zero)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(dims[0], dims[1]), nn.GELU(), nn.Linear(dims[1], dims[2]))
    model.requires_grad_(False)
    inject_lora(model, LoRASpec(["0", "2"], rank=4, alpha=8), "v")
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B["v"].normal_(0, 0.2)
    return model


def randomize_lora(model: nn.Module, std: float = 0.3) -> None:
    """Give every adapter a non-zero delta (B starts at zero for Linear/Conv1D)."""
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for p in list(layer.lora_A.values()) + list(layer.lora_B.values()):
                p.normal_(0, std)


def reference_layer(layer, x: torch.Tensor, weights: dict) -> torch.Tensor:
    """float64: base(x) + sum_i w_i * s_i * (x A_i^T) B_i^T, computed from scratch per adapter."""
    W = layer.weight.double()
    b = layer.bias.double() if getattr(layer, "bias", None) is not None else None
    if layer.layout == "out_in":
        y = x.double() @ W.t() + b
    elif hasattr(layer, "nf"):
        y = x.double() @ W + b
    else:
        y = W[x]
    for name, w in weights.items():
        A, B = layer.lora_A[name].double(), layer.lora_B[name].double()
        h = A.t()[x] if not torch.is_floating_point(x) else x.double() @ A.t()
        s = layer.scaling[name]
        if isinstance(w, torch.Tensor):
            s = w.double().view(-1, *([1] * (h.dim() - 1))) * s
        else:
            s = float(w) * s
        y = y + (h * s) @ B.t()
    return y
