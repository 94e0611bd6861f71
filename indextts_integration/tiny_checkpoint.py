"""Write a tiny, randomly initialised IndexTTS2 checkpoint directory in the layout of the real ``checkpoints/``.

Every model is an instance of the real upstream / transformers class, only smaller, so that data preparation,
training and upstream's inference path run with no download. Widths that upstream hard-codes stay real:
w2v-bert features are 1024-d at hidden layer 17 (UnifiedVoice's conformer input is fixed at 1024 and
IndexTTS2.get_emb reads hidden_states[17]), mel codes are 8194, style vectors 192-d, mels 80 bands.
"""
from __future__ import annotations

import copy
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any, Iterable

import torch
import yaml

from indextts_integration import model_dir as md
from indextts_integration.demo_sentences import BPE_EXTRA_TEXT, DEMO_SENTENCES

TINY_REVISION = hashlib.sha1(b"indextts-lora tiny checkpoint v1").hexdigest()  # fake hub commit of our snapshots
EMO_NUM = [3, 17, 2, 8, 4, 5, 10, 24]  # upstream's emotion/speaker matrix split (73 rows)
BIGVGAN_NAME = "nvidia/bigvgan_v2_22khz_80band_256x"

TINY_GPT: dict[str, Any] = {
    "model_dim": 64, "max_mel_tokens": 1815, "max_text_tokens": 600, "heads": 4, "use_mel_codes_as_input": True,
    "mel_length_compression": 1024, "layers": 2, "number_text_tokens": None,  # set from the trained BPE
    "number_mel_codes": 8194, "start_mel_token": 8192, "stop_mel_token": 8193, "start_text_token": 0,
    "stop_text_token": 1, "train_solo_embeddings": False, "condition_type": "conformer_perceiver",
    "condition_module": {"output_size": 32, "linear_units": 64, "attention_heads": 2, "num_blocks": 1,
                         "input_layer": "conv2d2", "perceiver_mult": 1},
    "emo_condition_module": {"output_size": 32, "linear_units": 64, "attention_heads": 2, "num_blocks": 1,
                             "input_layer": "conv2d2", "perceiver_mult": 1},
}

TINY_SEMANTIC_CODEC = {"codebook_size": 8192, "hidden_size": 1024, "codebook_dim": 8, "vocos_dim": 16,
                       "vocos_intermediate_dim": 32, "vocos_num_layers": 1}

TINY_S2MEL: dict[str, Any] = {
    "preprocess_params": {"sr": 22050, "spect_params": {"n_fft": 1024, "win_length": 1024, "hop_length": 256,
                                                       "n_mels": 80, "fmin": 0, "fmax": "None"}},
    "dit_type": "DiT", "reg_loss_type": "l1", "style_encoder": {"dim": 192},
    "length_regulator": {"channels": 32, "is_discrete": False, "in_channels": 1024, "content_codebook_size": 2048,
                         "sampling_ratios": [1, 1], "vector_quantize": False, "n_codebooks": 1,
                         "quantizer_dropout": 0.0, "f0_condition": False, "n_f0_bins": 512},
    "DiT": {"hidden_dim": 32, "num_heads": 2, "depth": 2, "class_dropout_prob": 0.1, "block_size": 8192,
            "in_channels": 80, "style_condition": True, "final_layer_type": "wavenet", "target": "mel",
            "content_dim": 32, "content_codebook_size": 64, "content_type": "discrete", "f0_condition": False,
            "n_f0_bins": 512, "content_codebooks": 1, "is_causal": False, "long_skip_connection": True,
            "zero_prompt_speech_token": False, "time_as_token": False, "style_as_token": False,
            "uvit_skip_connection": True, "add_resblock_in_transformer": False},
    "wavenet": {"hidden_dim": 32, "num_layers": 2, "kernel_size": 5, "dilation_rate": 1, "p_dropout": 0.2,
                "style_condition": True},
}

TINY_CAMPPLUS = {"growth_rate": 4, "bn_size": 1, "init_channels": 16}

TINY_BIGVGAN = {
    "resblock": "1", "num_gpus": 0, "upsample_rates": [4, 4, 4, 4], "upsample_kernel_sizes": [8, 8, 8, 8],
    "upsample_initial_channel": 32, "resblock_kernel_sizes": [3], "resblock_dilation_sizes": [[1, 3, 5]],
    "use_tanh_at_final": False, "use_bias_at_final": False, "activation": "snakebeta", "snake_logscale": True,
    "num_mels": 80, "num_freq": 1025, "n_fft": 1024, "hop_size": 256, "win_size": 1024, "sampling_rate": 22050,
    "fmin": 0, "fmax": None, "fmax_for_loss": None, "normalize_volume": True, "segment_size": 65536,
}

# w2v-bert: width 1024 and 17 layers are fixed by upstream (see module docstring); everything else is minimal.
TINY_W2V_BERT = {"hidden_size": 1024, "num_hidden_layers": 17, "num_attention_heads": 16, "intermediate_size": 16,
                 "conv_depthwise_kernel_size": 3, "feature_projection_input_dim": 160, "add_adapter": False,
                 "layerdrop": 0.0}


def build_config(number_text_tokens: int) -> dict[str, Any]:
    """config.yaml contents: every section IndexTTS2 reads, with the tiny model sizes."""
    gpt = copy.deepcopy(TINY_GPT)
    gpt["number_text_tokens"] = number_text_tokens
    mel = {"sample_rate": 24000, "n_fft": 1024, "hop_length": 256, "win_length": 1024, "n_mels": 100,
           "mel_fmin": 0, "normalize": False}
    return {
        "dataset": {"bpe_model": "bpe.model", "sample_rate": 24000, "squeeze": False, "mel": mel},
        "gpt": gpt, "semantic_codec": dict(TINY_SEMANTIC_CODEC), "s2mel": copy.deepcopy(TINY_S2MEL),
        "gpt_checkpoint": "gpt.pth", "w2v_stat": "wav2vec2bert_stats.pt", "s2mel_checkpoint": "s2mel.pth",
        "emo_matrix": "feat2.pt", "spk_matrix": "feat1.pt", "emo_num": list(EMO_NUM),
        "qwen_emo_path": "qwen0.6bemo4-merge/", "vocoder": {"type": "bigvgan", "name": BIGVGAN_NAME},
        "version": 2.0, "tiny": True,
    }


def bpe_corpus() -> list[str]:
    """Training text for the tiny BPE, shaped like TextTokenizer's input (normalised, upper-cased words)."""
    from indextts.utils.common import tokenize_by_CJK_char

    return [tokenize_by_CJK_char(s) for s in (*DEMO_SENTENCES, *BPE_EXTRA_TEXT)]


def train_bpe(path: Path, lines: Iterable[str], vocab_size: int = 256) -> int:
    """Train a sentencepiece BPE with upstream's special ids (<s>=0, </s>=1, <unk>=2); returns its size."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(lines)), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, bos_id=0, eos_id=1, unk_id=2, pad_id=-1, hard_vocab_limit=False,
        minloglevel=2)
    path.write_bytes(buf.getvalue())
    return spm.SentencePieceProcessor(model_file=str(path)).GetPieceSize()


def hub_snapshot_dir(out: Path, repo_id: str) -> Path:
    """Create ``hf_cache/models--ORG--NAME/{refs/main,snapshots/REV}`` as huggingface_hub's cache would."""
    repo = md.hub_cache_dir(out) / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(TINY_REVISION)
    snap = repo / "snapshots" / TINY_REVISION
    snap.mkdir(parents=True, exist_ok=True)
    return snap


def write_w2v_bert(out: Path) -> torch.nn.Module:
    """Tiny Wav2Vec2BertModel + SeamlessM4TFeatureExtractor saved with save_pretrained (fp16 on disk)."""
    from transformers import SeamlessM4TFeatureExtractor, Wav2Vec2BertConfig, Wav2Vec2BertModel

    snap = hub_snapshot_dir(out, md.W2V_BERT_REPO)
    model = Wav2Vec2BertModel(Wav2Vec2BertConfig(**TINY_W2V_BERT)).eval()
    model.half().save_pretrained(snap, safe_serialization=True)  # loaders read it back as fp32
    SeamlessM4TFeatureExtractor().save_pretrained(snap)
    return model.float()


def write_w2v_stats(out: Path, w2v: torch.nn.Module, seed: int) -> None:
    """wav2vec2bert_stats.pt ({'mean','var'} of layer-17 states), measured on a few seconds of noise."""
    from transformers import SeamlessM4TFeatureExtractor

    g = torch.Generator().manual_seed(seed)
    audio = (0.1 * torch.randn(2, 16000 * 2, generator=g)).numpy()
    fe = SeamlessM4TFeatureExtractor()
    inputs = fe(list(audio), sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        feat = w2v(**inputs, output_hidden_states=True).hidden_states[md.W2V_LAYER].reshape(-1, 1024)
    torch.save({"mean": feat.mean(0), "var": feat.var(0).clamp_min(1e-5)}, out / "wav2vec2bert_stats.pt")


def write_semantic_codec(out: Path, cfg: dict[str, Any]) -> None:
    """MaskGCT RepCodec as semantic_codec/model.safetensors in the amphion/MaskGCT snapshot."""
    import safetensors.torch
    from omegaconf import OmegaConf
    from indextts.utils.maskgct_utils import build_semantic_codec

    codec = build_semantic_codec(OmegaConf.create(cfg["semantic_codec"]))
    path = hub_snapshot_dir(out, md.MASKGCT_REPO) / md.SEMANTIC_CODEC_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_model(codec, str(path))


def write_campplus(out: Path) -> None:
    """Tiny CAMPPlus (192-d output kept) as campplus_cn_common.bin + our campplus_config.json sizes."""
    from indextts.s2mel.modules.campplus.DTDNN import CAMPPlus

    snap = hub_snapshot_dir(out, md.CAMPPLUS_REPO)
    model = CAMPPlus(feat_dim=80, embedding_size=192, **TINY_CAMPPLUS)
    torch.save(model.state_dict(), snap / md.CAMPPLUS_FILE)
    (snap / md.CAMPPLUS_CONFIG_FILE).write_text(json.dumps(TINY_CAMPPLUS))


def write_bigvgan(out: Path) -> None:
    """Tiny BigVGAN (upstream s2mel copy of the class): config.json + bigvgan_generator.pt."""
    from indextts.s2mel.modules.bigvgan import bigvgan
    from indextts.s2mel.modules.bigvgan.env import AttrDict

    snap = hub_snapshot_dir(out, BIGVGAN_NAME)
    model = bigvgan.BigVGAN(AttrDict(TINY_BIGVGAN), use_cuda_kernel=False)
    torch.save({"generator": model.state_dict()}, snap / "bigvgan_generator.pt")
    (snap / "config.json").write_text(json.dumps(TINY_BIGVGAN, indent=2))


def write_s2mel(out: Path, cfg: dict[str, Any]) -> None:
    """s2mel.pth in upstream's {'net': {module: state_dict}} form, read by load_checkpoint2."""
    from omegaconf import OmegaConf

    s2mel = md.build_s2mel(OmegaConf.create(cfg), gpt_dim=cfg["gpt"]["model_dim"])
    torch.save({"net": {k: m.state_dict() for k, m in s2mel.models.items()}}, out / "s2mel.pth")


def write_gpt(out: Path, cfg: dict[str, Any]) -> None:
    """gpt.pth = state_dict of a fresh tiny UnifiedVoice, taken BEFORE post_init_gpt2_config.

    Upstream trap: post_init_gpt2_config sets gpt.wte = mel_embedding and registers inference_model, which
    adds alias keys to state_dict(); a gpt.pth saved after it no longer loads strictly into a fresh model.
    """
    from omegaconf import OmegaConf

    model = md.build_unified_voice(OmegaConf.create(cfg))
    torch.save(model.state_dict(), out / "gpt.pth")


def write_matrices(out: Path, model_dim: int, seed: int) -> None:
    """feat1.pt speaker matrix [73, 192] (CAMPPlus space) and feat2.pt emotion matrix [73, model_dim]."""
    g = torch.Generator().manual_seed(seed + 1)
    rows = sum(EMO_NUM)
    torch.save(torch.randn(rows, 192, generator=g), out / "feat1.pt")
    torch.save(0.02 * torch.randn(rows, model_dim, generator=g), out / "feat2.pt")


def make_tiny_checkpoint(output_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write the whole tiny checkpoint directory; deterministic for a given seed. Returns its path."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    n_text = train_bpe(out / "bpe.model", bpe_corpus())
    cfg = build_config(number_text_tokens=n_text)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    write_gpt(out, cfg)
    write_matrices(out, cfg["gpt"]["model_dim"], seed)
    w2v = write_w2v_bert(out)
    write_w2v_stats(out, w2v, seed)
    write_semantic_codec(out, cfg)
    write_campplus(out)
    write_s2mel(out, cfg)
    write_bigvgan(out)
    return out
