"""--eval-audio-every for IndexTTS2 (indextts_integration/audio_eval.py): a real training run on the tiny default
synthesizes the eval texts every 2 steps through upstream IndexTTS2.infer and picks its best checkpoint by
speaker similarity."""
from __future__ import annotations

import json

import pytest
import soundfile as sf
import torch

from indextts_integration.demo_sentences import DEMO_SENTENCES

pytestmark = pytest.mark.upstream


def test_best_checkpoint_by_speaker_similarity(tiny_ckpt, demo_dir, tmp_path):
    from indextts_integration.prepare import PrepareOptions, prepare_dataset
    from indextts_integration.training import make_task
    from lora_engine.training import TrainConfig, train
    from lora_engine.training.checkpoint import best_checkpoint, read_meta
    from lora_engine.training.metrics import read_metrics
    from safetensors.torch import load_file

    prep = tmp_path / "prep"
    prepare_dataset(PrepareOptions(model_dir=tiny_ckpt, audio_dir=demo_dir, transcripts=demo_dir / "transcripts.csv",
                                   output_dir=prep, val_ratio=0.34, progress=False))
    texts = tmp_path / "texts.txt"
    texts.write_text("Hello there, this is a test.\n")
    cfg = TrainConfig(model_dir=str(tiny_ckpt), train_manifests=[str(prep / "train_manifest.jsonl")],
                      output_dir=str(tmp_path / "run"), max_steps=4, batch_size=2, learning_rate=5e-2,
                      save_every=0, keep_last=1, eval_audio_every=2, best_metric="speaker_similarity",
                      progress=False, tensorboard=False,
                      task_options={"eval_reference_audio": str(demo_dir / "demo_000.wav"),
                                    "eval_prompt_audio": str(demo_dir / "demo_001.wav"),
                                    "eval_reference_text": DEMO_SENTENCES[0], "eval_texts": str(texts),
                                    "eval_max_mel_tokens": 20})
    task = make_task(cfg)
    train(cfg, task)

    lines = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "speaker_similarity" in r]
    assert [r["step"] for r in lines] == [2, 4]
    sims = [r["speaker_similarity"] for r in lines]
    assert all(-1 <= s <= 1 and s != 0 for s in sims) and all(r["duration_ratio"] > 0 for r in lines)
    for step in (2, 4):
        audio, sr = sf.read(tmp_path / "run" / "eval_audio" / f"step-{step:08d}" / "00.wav")
        assert sr == 22050 and abs(audio).max() > 0
    best = best_checkpoint(tmp_path / "run" / "checkpoints")
    assert read_meta(best)["speaker_similarity"] == max(sims)
    best_file = load_file(str(tmp_path / "run" / "adapter_best.safetensors"))
    assert all(torch.equal(v, best_file[k]) for k, v in load_file(str(best / "adapter.safetensors")).items())
    # the eval GPT holds the trained LoRA tensors (copied), not the zero-B initial ones
    lora = {n: p for n, p in task.periodic_eval.tts.gpt.named_parameters() if ".lora_B" in n}
    assert lora and any(p.abs().max() > 0 for p in lora.values())


def test_missing_eval_options_say_what_to_set(tiny_ckpt, tmp_path):
    from indextts_integration.training import make_task
    from lora_engine.training import TrainConfig

    cfg = TrainConfig(model_dir=str(tiny_ckpt), output_dir=str(tmp_path), eval_audio_every=2)
    with pytest.raises(ValueError, match="eval_reference_audio.*--task-option"):
        make_task(cfg)
