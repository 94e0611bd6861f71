"""IndexTTS2 with voice adapters: apply one to a live instance, switch and blend voices without reloading.

Runs on the embedded default: a tiny IndexTTS2 checkpoint written by make_tiny_checkpoint (the real upstream
classes with random weights, so the audio is noise-like). With real weights, pass your checkpoints/ folder
and adapters trained by scripts/train.py instead. Needs the IndexTTS2 environment (indextts2-cli installed;
here: bash scripts/setup_upstream_env.sh).

    python examples/07_indextts2_adapter_and_live_blend.py [--model-dir checkpoints/]
"""
import argparse
import sys
import tempfile
from pathlib import Path

import soundfile as sf
import torch

from indextts_integration.demo_data import make_demo_dataset
from indextts_integration.deploy import apply_adapter, set_voice_blend, write_merged_gpt
from indextts_integration.model_dir import build_unified_voice, load_config, load_unified_voice
from indextts_integration.targets import preset_targets
from indextts_integration.tiny_checkpoint import make_tiny_checkpoint
from indextts_integration.upstream_tts import build_indextts2
from lora_engine import LoRASpec, inject_lora, lora_layers, save_adapter

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model-dir", type=Path, help="an IndexTTS2 checkpoints/ dir (default: write a tiny one)")
args = parser.parse_args()
tmp = tempfile.TemporaryDirectory()  # removed when the script exits
work = Path(tmp.name)
model_dir = args.model_dir or make_tiny_checkpoint(work / "checkpoints", seed=0)

# Two stand-in voice adapters on the GPT blocks (c_attn, c_proj, c_fc, c_proj of every layer).
# Real ones come from scripts/train.py; here B gets random values so the voices differ.
targets = preset_targets("gpt-attn-mlp")
print("LoRA targets:", targets)
adapter_files = {}
for seed, name in enumerate(["alice", "bob"]):
    gpt = load_unified_voice(model_dir)
    inject_lora(gpt, LoRASpec(targets, rank=8, alpha=16), adapter=name)
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(gpt).values():
            layer.lora_B[name].normal_(0, 0.02)
    adapter_files[name] = work / f"{name}.safetensors"
    save_adapter(gpt, adapter_files[name], adapter=name)
print("adapters:", {n: f"{p.stat().st_size:,} bytes" for n, p in adapter_files.items()})

# A live IndexTTS2 (upstream's class; every component loaded from model_dir, nothing downloaded).
tts = build_indextts2(model_dir)
blocks = tts.gpt.inference_model.transformer  # generation runs these GPT-2 blocks (shared with tts.gpt.gpt)
probe = torch.randn(1, 12, tts.gpt.model_dim, generator=torch.Generator().manual_seed(0))


def hidden() -> torch.Tensor:
    with torch.no_grad():
        return blocks(inputs_embeds=probe).last_hidden_state


base_out = hidden()
blend = apply_adapter(tts, [(adapter_files["alice"], 1.0), (adapter_files["bob"], 0.0)])
print("applied:", blend, "- generation sees the adapter:", type(blocks.h[0].attn.c_attn).__name__)
alice_out = hidden()

set_voice_blend(tts, {"alice": 0.5, "bob": 0.5})  # a new voice, no reload
blend_out = hidden()

# The same 50/50 blend merged into a gpt.pth (what scripts/merge.py writes) must give the same outputs.
merged_path = write_merged_gpt(model_dir, [(adapter_files["alice"], 0.5), (adapter_files["bob"], 0.5)],
                               work / "gpt_blend.pth")
merged = build_unified_voice(load_config(model_dir)).eval()
merged.load_state_dict(torch.load(merged_path, weights_only=True), strict=True)
with torch.no_grad():
    merged_out = merged.gpt(inputs_embeds=probe).last_hidden_state
blend_err = (blend_out - merged_out).abs().max().item()
print(f"live 50/50 blend vs merged gpt.pth: max abs diff {blend_err:.2e}")

set_voice_blend(tts, {})  # back to the base voice, exactly
base_again = torch.equal(hidden(), base_out)
print("empty blend gives the base model's outputs bit for bit:", base_again)

# Speak through upstream's IndexTTS2.infer with the blended voice.
set_voice_blend(tts, {"alice": 0.5, "bob": 0.5})
prompt = sorted(make_demo_dataset(work / "prompt", n_utterances=1).parent.glob("*.wav"))[0]
torch.manual_seed(0)
wav = tts.infer(spk_audio_prompt=str(prompt), text="Hello there.", output_path=str(work / "blend.wav"),
                max_mel_tokens=20, num_beams=1, do_sample=False, verbose=False)
audio, sr = sf.read(wav)
print(f"synthesized {len(audio) / sr:.2f} s of audio at {sr} Hz with the live blend")

voices_differ = (alice_out - base_out).abs().max().item() > 1e-3 and (blend_out - alice_out).abs().max().item() > 1e-4
ok = voices_differ and blend_err < 1e-4 and base_again and sr == 22050 and audio.size > 0
print("OK" if ok else "FAILED")
sys.exit(0 if ok else 1)
