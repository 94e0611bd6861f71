"""Per-utterance training features, computed exactly as upstream IndexTTS2 computes them at inference.

- text ids: upstream TextNormalizer + TextTokenizer (bpe.model) -> ``tokenizer.encode(text)``.
- cond_feat: w2v-bert-2.0 hidden_states[17] of the 16 kHz audio, normalised by wav2vec2bert_stats.pt
  (``IndexTTS2.get_emb``); [T, 1024] at 50 frames/s. It is UnifiedVoice's conditioning input.
- codes: MaskGCT semantic codec ``quantize(cond_feat)`` indices; [T] in [0, 8192): the GPT's mel targets.
- cond_latent / emo_vec: the frozen checkpoint's ``get_conditioning`` (32 x model_dim perceiver latents) and
  ``get_emovec`` (model_dim) of this utterance, so a trainer that keeps the conditioning encoders frozen needs
  no w2v-bert or conformer pass; one that trains them recomputes both from cond_feat.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from indextts_integration import model_dir as md


@dataclass
class UtteranceFeatures:
    """Tensors of one utterance (CPU): codes [T] int16, cond_feat [T,1024] fp16, cond_latent [32,D], emo_vec [D]."""

    codes: torch.Tensor
    cond_feat: torch.Tensor
    cond_latent: torch.Tensor
    emo_vec: torch.Tensor


class Featurizer:
    """Holds the frozen upstream models of one model dir and turns (text, audio) into training features."""

    def __init__(self, model_dir: str | os.PathLike, device: str = "cpu") -> None:
        self.device = device
        self.cfg = md.load_config(model_dir)
        self.tokenizer = md.load_text_tokenizer(model_dir, self.cfg)
        self.feature_extractor = md.load_feature_extractor(model_dir)
        w2v, mean, std = md.load_semantic_model(model_dir, self.cfg)
        self.w2v, self.mean, self.std = w2v.to(device), mean.to(device), std.to(device)
        self.codec = md.load_semantic_codec(model_dir, self.cfg).to(device)
        self.gpt = md.load_unified_voice(model_dir, self.cfg).to(device).eval()
        self.max_mel_tokens = int(self.cfg.gpt.max_mel_tokens)
        self.max_text_tokens = int(self.cfg.gpt.max_text_tokens)

    def text_ids(self, text: str) -> tuple[list[int], int]:
        """Token ids of a transcript and how many of them are <unk>."""
        ids = self.tokenizer.encode(text)
        return list(ids), sum(1 for i in ids if i == self.tokenizer.unk_token_id)

    @torch.no_grad()
    def audio_features(self, audio_16k: torch.Tensor) -> UtteranceFeatures:
        """Features of one [1, n] 16 kHz waveform (see module docstring)."""
        inputs = self.feature_extractor(audio_16k, sampling_rate=16000, return_tensors="pt")
        out = self.w2v(input_features=inputs["input_features"].to(self.device),
                       attention_mask=inputs["attention_mask"].to(self.device), output_hidden_states=True)
        feat = (out.hidden_states[md.W2V_LAYER] - self.mean) / self.std           # [1, T, 1024]
        codes, _ = self.codec.quantize(feat)                                      # [1, T]
        lengths = torch.tensor([feat.shape[1]], device=self.device)
        # Upstream trap (layouts differ): get_conditioning wants [B, 1024, T] (inference_speech transposes
        # before calling it), while get_emovec wants [B, T, 1024] and transposes itself (merge_emovec).
        cond_latent = self.gpt.get_conditioning(feat.transpose(1, 2), lengths)     # [1, 32, D]
        emo_vec = self.gpt.get_emovec(feat, lengths)                              # [1, D]
        return UtteranceFeatures(codes=codes[0].to(torch.int16).cpu(), cond_feat=feat[0].half().cpu(),
                                 cond_latent=cond_latent[0].float().cpu(), emo_vec=emo_vec[0].float().cpu())


def describe(cfg: Any) -> dict[str, Any]:
    """The config facts a manifest must agree with (a trainer checks them against its model dir)."""
    return {"model_dim": int(cfg.gpt.model_dim), "max_mel_tokens": int(cfg.gpt.max_mel_tokens),
            "max_text_tokens": int(cfg.gpt.max_text_tokens), "number_text_tokens": int(cfg.gpt.number_text_tokens)}
