"""Move adapters to and from PEFT's directory format, with the same outputs in both libraries.

export_peft writes adapter_config.json + adapter_model.safetensors that peft.PeftModel.from_pretrained
loads; import_peft reads a directory written by peft's save_pretrained. The engine never imports peft:
the real peft here is only the other side of the round trip (pip install peft).

    python examples/06_peft_export_import.py
"""
import sys
import tempfile
import warnings
from pathlib import Path

import peft
import torch
from transformers import GPT2Config, GPT2Model

from lora_engine import LoRASpec, export_peft, import_peft, inject_lora, lora_layers

warnings.filterwarnings("ignore", module="peft")  # peft's fan_in_fan_out notices for GPT-2's Conv1D
ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(1))


def base_model() -> GPT2Model:
    torch.manual_seed(0)  # the same base weights every time
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2Model(cfg).eval()


def run(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state


tmp = tempfile.TemporaryDirectory()  # removed when the script exits
workdir = Path(tmp.name)
base_out = run(base_model())

# ours -> PEFT
ours = base_model()
inject_lora(ours, LoRASpec(["h.*.attn.c_attn", "h.*.mlp.c_fc"], rank=4, alpha=8), adapter="alice")
with torch.no_grad():
    for layer in lora_layers(ours).values():
        layer.lora_B["alice"].normal_(0, 0.1)
export_peft(ours, workdir / "alice_peft", adapter="alice")
print("exported:", sorted(p.name for p in (workdir / "alice_peft").iterdir()))
in_peft = peft.PeftModel.from_pretrained(base_model(), str(workdir / "alice_peft")).eval()
err_export = (run(in_peft) - run(ours)).abs().max().item()
print(f"peft.PeftModel.from_pretrained output vs ours: max abs diff {err_export:.2e}")

# PEFT -> ours
config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
theirs = peft.get_peft_model(base_model(), config)
with torch.no_grad():
    for name, p in theirs.named_parameters():
        if "lora_B" in name:
            p.normal_(0, 0.1)
theirs.save_pretrained(str(workdir / "bob_peft"))
mine = base_model()
import_peft(mine, workdir / "bob_peft", adapter="bob")
print("imported into:", list(lora_layers(mine)))
err_import = (run(mine) - run(theirs.eval())).abs().max().item()
print(f"import_peft output vs peft's: max abs diff {err_import:.2e}")

adapters_matter = min((run(ours) - base_out).abs().max(), (run(mine) - base_out).abs().max()).item() > 1e-2
ok = err_export < 1e-5 and err_import < 1e-5 and adapters_matter
print("OK" if ok else "FAILED")
sys.exit(0 if ok else 1)
