"""Build a real upstream ``IndexTTS2`` from a model directory with every component loaded locally.

Upstream's ``IndexTTS2.__init__`` downloads four hub models by name and always loads the Qwen emotion model
(which needs ``accelerate`` for ``device_map="auto"``). We create the instance without running that
``__init__`` and set the same attributes in the same order, loading each component from the model dir
(``model_dir.py``); upstream's ``infer`` / ``infer_generator`` then run unchanged.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from indextts_integration import model_dir as md


def _mel_fn(cfg: Any):
    """The s2mel mel spectrogram closure IndexTTS2.__init__ builds (22.05 kHz, 80 bands, center=False)."""
    from indextts.s2mel.modules.audio import mel_spectrogram

    spect = cfg.s2mel["preprocess_params"]["spect_params"]
    args = {"n_fft": spect["n_fft"], "win_size": spect["win_length"], "hop_size": spect["hop_length"],
            "num_mels": spect["n_mels"], "sampling_rate": cfg.s2mel["preprocess_params"]["sr"],
            "fmin": spect.get("fmin", 0), "fmax": None if spect.get("fmax", "None") == "None" else 8000,
            "center": False}
    return lambda x: mel_spectrogram(x, **args)


def build_indextts2(model_dir: str | os.PathLike, device: str = "cpu", use_fp16: bool = False,
                    use_accel: bool = False, use_deepspeed: bool = False, gpt: torch.nn.Module | None = None,
                    load_qwen_emotion: bool = False) -> Any:
    """An ``indextts.infer_v2.IndexTTS2`` whose weights all come from ``model_dir`` (no network).

    ``gpt``: an already-built UnifiedVoice (e.g. with LoRA injected or merged) used instead of loading gpt.pth;
    it must not have been through post_init_gpt2_config yet (this function calls it, as upstream does).
    """
    from indextts.infer_v2 import IndexTTS2, QwenEmotion

    cfg = md.load_config(model_dir)
    tts = IndexTTS2.__new__(IndexTTS2)
    tts.device = device
    tts.use_fp16 = use_fp16 and device != "cpu"  # as upstream: no fp16 on CPU (its .half() GPT cannot run there)
    tts.use_cuda_kernel = False
    tts.cfg, tts.model_dir = cfg, str(model_dir)
    tts.dtype = torch.float16 if tts.use_fp16 else None
    tts.stop_mel_token = cfg.gpt.stop_mel_token
    tts.use_accel, tts.use_torch_compile = use_accel, False
    qwen_dir = Path(model_dir) / str(cfg.qwen_emo_path).strip()
    tts.qwen_emo = QwenEmotion(str(qwen_dir)) if load_qwen_emotion and qwen_dir.is_dir() else None

    tts.gpt = gpt if gpt is not None else md.load_unified_voice(model_dir, cfg, use_accel=use_accel)
    tts.gpt_path = str(md.model_file(model_dir, cfg.gpt_checkpoint))
    tts.gpt = tts.gpt.to(device)
    # Upstream trap: with fp16 the GPT is .half()-ed BEFORE post_init; adapters applied later must match dtype.
    tts.gpt.eval().half() if tts.use_fp16 else tts.gpt.eval()
    # Upstream trap: post_init builds inference_model sharing the blocks (and with use_accel COPIES them into
    # the accel engine, strict=False): weights changed after this call must be mirrored there.
    tts.gpt.post_init_gpt2_config(use_deepspeed=use_deepspeed, kv_cache=True, half=tts.use_fp16)

    tts.extract_features = md.load_feature_extractor(model_dir)
    tts.semantic_model, tts.semantic_mean, tts.semantic_std = md.load_semantic_model(model_dir, cfg)
    tts.semantic_model = tts.semantic_model.to(device)
    tts.semantic_mean, tts.semantic_std = tts.semantic_mean.to(device), tts.semantic_std.to(device)
    tts.semantic_codec = md.load_semantic_codec(model_dir, cfg).to(device)
    tts.s2mel = md.load_s2mel(model_dir, cfg).to(device)
    tts.s2mel.models["cfm"].estimator.setup_caches(max_batch_size=1, max_seq_length=8192)
    tts.campplus_model = md.load_campplus(model_dir).to(device)
    tts.bigvgan = md.load_bigvgan(model_dir, cfg).to(device)

    tts.bpe_path = str(md.model_file(model_dir, cfg.dataset["bpe_model"]))
    tts.tokenizer = md.load_text_tokenizer(model_dir, cfg)
    tts.normalizer = tts.tokenizer.normalizer
    emo, spk = md.load_emotion_matrices(model_dir, cfg)
    tts.emo_matrix = tuple(t.to(device) for t in emo)
    tts.spk_matrix = tuple(t.to(device) for t in spk)
    tts.emo_num = list(cfg.emo_num)
    tts.mel_fn = _mel_fn(cfg)
    tts.cache_spk_cond = tts.cache_s2mel_style = tts.cache_s2mel_prompt = None
    tts.cache_spk_audio_prompt = tts.cache_emo_cond = tts.cache_emo_audio_prompt = tts.cache_mel = None
    tts.gr_progress = None
    tts.model_version = cfg.get("version", None)
    return tts
