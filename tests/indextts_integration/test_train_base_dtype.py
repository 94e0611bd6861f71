"""--base-dtype bf16 on the real UnifiedVoice: the frozen base is held in bf16 (its norms in fp32), training matches
the fp32 base closely, and the adapter loads onto the fp32 gpt.pth (the fingerprint keeps the bf16 rounding)."""
from __future__ import annotations

import pytest

from benchmarks.ddp_scaling import make_model_dir, write_manifest
from indextts_integration import model_dir as md
from indextts_integration.training import make_task
from lora_engine import load_adapter
from lora_engine.training import TrainConfig, train

pytestmark = pytest.mark.upstream


def test_bf16_base_trains_the_indextts2_task_and_its_adapter_fits_the_fp32_checkpoint(tmp_path):
    gpt = make_model_dir(tmp_path / "model", tiny=True)
    manifest = write_manifest(tmp_path / "data", gpt, 8)
    losses = {}
    for base_dtype in ("bf16", "auto"):
        cfg = TrainConfig(model_dir=str(tmp_path / "model"), train_manifests=[str(manifest)], max_steps=6,
                          output_dir=str(tmp_path / base_dtype), batch_size=2, base_dtype=base_dtype, amp="bf16",
                          device="cpu", learning_rate=1e-3, save_every=0, tensorboard=False, plot=False,
                          progress=False)
        losses[base_dtype] = train(cfg, make_task(cfg)).loss
    # the prompt latents come in fp32 and the embeddings in bf16: without fp32 norms the CPU layer_norm refuses
    assert losses["bf16"] == pytest.approx(losses["auto"], rel=1e-2)
    model = md.load_unified_voice(tmp_path / "model")  # fp32, as gpt.pth holds it
    assert load_adapter(model, tmp_path / "bf16" / "adapter.safetensors") == "default"
