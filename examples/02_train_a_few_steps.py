"""Train a LoRA adapter with a plain PyTorch loop: only the adapter learns, the base stays bit for bit.

The model is the embedded synthetic task's tiny GPT-2 (random weights). Its data follow the rule
x[t+1] = (5 x[t] + 3) mod 48, so the loss can only fall below log(48) = 3.87 by learning. For real runs
(AMP, accumulation, checkpoints, resume, DDP) use scripts/train.py, which wraps lora_engine.training.train.

    python examples/02_train_a_few_steps.py
"""
import math
import sys

import torch

from lora_engine import LoRASpec, inject_lora
from lora_engine.training import synthetic

torch.manual_seed(0)
model = synthetic.build_model()  # GPT2LMHeadModel: 2 layers, width 32, vocabulary 48
base = {k: v.clone() for k, v in model.state_dict().items()}

inject_lora(model, LoRASpec(synthetic.TARGETS, rank=8, alpha=16), adapter="rule")
params = [p for p in model.parameters() if p.requires_grad]  # inject_lora froze everything else
optimizer = torch.optim.AdamW(params, lr=1e-2)
data = synthetic.make_sequences(512, seed=0)
val = synthetic.collate(synthetic.make_sequences(64, seed=1))


def val_loss() -> float:
    model.eval()
    with torch.no_grad():
        loss = synthetic.loss_fn(model, val).item()
    model.train()
    return loss


start = val_loss()
print(f"validation loss before training: {start:.3f} (uniform guess: {math.log(synthetic.VOCAB):.3f})")
model.train()
for step in range(1, 121):
    rows = torch.randint(0, len(data), (16,)).tolist()
    loss = synthetic.loss_fn(model, synthetic.collate([data[i] for i in rows]))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    if step % 30 == 0:
        print(f"step {step:3d}  train loss {loss.item():.3f}")
end = val_loss()
print(f"validation loss after 120 steps: {end:.3f}")

after = model.state_dict()
base_untouched = all(torch.equal(after[k], v) for k, v in base.items())
print("base weights unchanged bit for bit:", base_untouched)
print(f"trained {sum(p.numel() for p in params):,} LoRA parameters")

ok = base_untouched and end < 0.5 * start
print("OK" if ok else "FAILED")
sys.exit(0 if ok else 1)
