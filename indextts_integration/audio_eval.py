"""Periodic audio evaluation while training IndexTTS2 (`--eval-audio-every N`): synthesize fixed texts through
upstream IndexTTS2.infer with the adapter being trained, and score them like scripts/validate.py does, so the
best checkpoint can be chosen by speaker similarity (`--best-metric speaker_similarity`).

Task options (`--task-option KEY=VALUE`): eval_reference_audio (required; held-out audio of the target speaker),
eval_texts (required; a texts file as validate.py reads it), eval_prompt_audio (default: the reference),
eval_reference_text (its transcript: gives duration_ratio), eval_max_mel_tokens (default 600).

Cost: a second UnifiedVoice plus IndexTTS2's other models (w2v-bert, codec, s2mel, BigVGAN, CAMPPlus) live on
the training device from the first eval on; the training model itself is never touched (post_init would change it).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_engine import adapter_specs, inject_lora


class PeriodicAudioEval:
    """periodic_eval(model, step) for the IndexTTS2 task: {"speaker_similarity": mean, "duration_ratio": mean}."""

    def __init__(self, model_dir: str, options: dict[str, Any], output_dir: str, seed: int) -> None:
        from indextts_integration.synthesis import read_texts

        missing = [k for k in ("eval_reference_audio", "eval_texts") if not options.get(k)]
        if missing:
            raise ValueError(f"--eval-audio-every needs the task options {missing}: e.g. --task-option "
                             "eval_reference_audio=heldout.wav --task-option eval_texts=texts.txt")
        self.reference = str(options["eval_reference_audio"])
        if not Path(self.reference).is_file():
            raise FileNotFoundError(f"eval_reference_audio {self.reference}: audio file not found")
        self.prompt = str(options.get("eval_prompt_audio") or self.reference)
        self.reference_text = options.get("eval_reference_text")
        self.texts = read_texts(options["eval_texts"])
        self.max_mel_tokens = int(options.get("eval_max_mel_tokens") or 600)
        self.model_dir, self.out, self.seed = model_dir, Path(output_dir) / "eval_audio", seed
        self.tts: Any = None
        self.scorer: Any = None

    def _build(self, model: nn.Module) -> None:
        """An IndexTTS2 with its own copy of the base GPT, given the same LoRA layers as the training model."""
        from indextts_integration import model_dir as md
        from indextts_integration.deploy import set_voice_blend
        from indextts_integration.sample_scoring import SampleScorer
        from indextts_integration.upstream_tts import build_indextts2

        device = next(model.parameters()).device
        gpt = md.load_unified_voice(self.model_dir)
        specs = adapter_specs(model)
        for name, spec in specs.items():
            inject_lora(gpt, spec, adapter=name)
        self.tts = build_indextts2(self.model_dir, device=str(device), gpt=gpt)
        set_voice_blend(self.tts, {name: 1.0 for name in specs})
        self.scorer = SampleScorer(self.tts.campplus_model, self.reference, self.reference_text)

    @torch.no_grad()
    def copy_lora(self, model: nn.Module) -> None:
        """Copy the training model's current LoRA tensors into the eval GPT (same module paths)."""
        own = dict(self.tts.gpt.named_parameters())
        for name, p in model.named_parameters():
            if ".lora_" in name:
                own[name].copy_(p)

    def __call__(self, model: nn.Module, step: int) -> dict[str, float]:
        from indextts_integration.synthesis import synthesize

        if self.tts is None:
            self._build(model)
        self.copy_lora(model)
        scores = []
        for i, item in enumerate(self.texts):
            wav = synthesize(self.tts, item.text, self.prompt, self.out / f"step-{step:08d}" / f"{i:02d}.wav",
                             seed=self.seed + i, max_mel_tokens=self.max_mel_tokens)
            scores.append(self.scorer.score(wav, item))
        out = {"speaker_similarity": sum(s["speaker_similarity"] for s in scores) / len(scores)}
        ratios = [s["duration_ratio"] for s in scores if s["duration_ratio"] is not None]
        if ratios:
            out["duration_ratio"] = sum(ratios) / len(ratios)
        return out
