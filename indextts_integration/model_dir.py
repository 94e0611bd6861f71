"""Load every IndexTTS2 component from one model directory, with no hub download.

One code path serves a user's real ``checkpoints/`` and our tiny checkpoint: both hold config.yaml, gpt.pth,
bpe.model, wav2vec2bert_stats.pt, feat1.pt/feat2.pt, s2mel.pth, and the hub models under ``hf_cache/`` in the
Hugging Face cache layout (``hf_cache/models--ORG--NAME/snapshots/REV/FILE``), which is where upstream's
``infer_v2`` caches them (it sets HF_HUB_CACHE=./checkpoints/hf_cache).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

# Hub models that upstream IndexTTS2.__init__ fetches by name (indextts/infer_v2.py, indextts/utils/maskgct_utils.py).
W2V_BERT_REPO = "facebook/w2v-bert-2.0"           # SeamlessM4TFeatureExtractor + Wav2Vec2BertModel.from_pretrained
MASKGCT_REPO = "amphion/MaskGCT"                  # hf_hub_download(..., "semantic_codec/model.safetensors")
SEMANTIC_CODEC_FILE = "semantic_codec/model.safetensors"
CAMPPLUS_REPO = "funasr/campplus"                 # hf_hub_download(..., "campplus_cn_common.bin")
CAMPPLUS_FILE = "campplus_cn_common.bin"
CAMPPLUS_CONFIG_FILE = "campplus_config.json"     # ours, optional: constructor kwargs for a non-default CAMPPlus
HUB_CACHE_SUBDIR = "hf_cache"
W2V_LAYER = 17                                    # upstream IndexTTS2.get_emb reads hidden_states[17]


class ModelDirError(FileNotFoundError):
    """A file the model directory should hold is missing."""


def load_config(model_dir: str | os.PathLike) -> Any:
    """Read ``config.yaml`` of a model directory as upstream does (OmegaConf)."""
    from omegaconf import OmegaConf

    path = Path(model_dir) / "config.yaml"
    if not path.is_file():
        raise ModelDirError(f"{path} not found: --model-dir must point at an IndexTTS2 checkpoints/ directory "
                            "(config.yaml, gpt.pth, bpe.model, ...) or one made by scripts/make_tiny_checkpoint.py.")
    return OmegaConf.load(path)


def model_file(model_dir: str | os.PathLike, name: str) -> Path:
    """Path of a file named in config.yaml (e.g. ``cfg.gpt_checkpoint``), checked to exist."""
    path = Path(model_dir) / str(name).strip()
    if not path.exists():
        raise ModelDirError(f"{path} not found in the model directory; config.yaml names it.")
    return path


def hub_cache_dir(model_dir: str | os.PathLike) -> Path:
    """Where the model directory keeps its hub models (upstream's HF_HUB_CACHE=./checkpoints/hf_cache)."""
    return Path(model_dir) / HUB_CACHE_SUBDIR


def resolve_hub_snapshot(model_dir: str | os.PathLike, repo_id: str, required: tuple[str, ...] = ()) -> Path:
    """Local snapshot folder of ``repo_id``: the model dir's hf_cache first, then the user's default HF cache.

    Passes ``cache_dir`` explicitly: importing indextts.infer_v2 rewrites os.environ['HF_HUB_CACHE'] to a path
    relative to the current directory, which only takes effect if huggingface_hub was not imported before
    (upstream trap: cache location depends on import order and cwd).
    """
    from huggingface_hub import snapshot_download

    tried = []
    for cache in (hub_cache_dir(model_dir), None):
        try:
            kwargs = {"cache_dir": str(cache)} if cache is not None else {}
            folder = Path(snapshot_download(repo_id, local_files_only=True, **kwargs))
        except Exception as exc:  # noqa: BLE001 - huggingface_hub raises several types for "not cached"
            tried.append(f"{cache or 'default HF cache'}: {type(exc).__name__}")
            continue
        if all((folder / name).exists() for name in required):
            return folder
        tried.append(f"{folder}: lacks {required}")
    raise ModelDirError(
        f"hub model {repo_id!r} is not cached locally (tried {'; '.join(tried)}). Run stock IndexTTS2 once with "
        f"network so it caches into {hub_cache_dir(model_dir)}, or copy that snapshot there; nothing is downloaded.")


def resolve_hub_file(model_dir: str | os.PathLike, repo_id: str, filename: str) -> Path:
    """Local path of one file of a hub repo (what upstream gets from hf_hub_download)."""
    return resolve_hub_snapshot(model_dir, repo_id, required=(filename,)) / filename


def load_text_tokenizer(model_dir: str | os.PathLike, cfg: Any = None) -> Any:
    """Upstream TextNormalizer + TextTokenizer over the dir's bpe.model (as IndexTTS2.__init__ builds them)."""
    from indextts.utils.front import TextNormalizer, TextTokenizer

    cfg = cfg if cfg is not None else load_config(model_dir)
    normalizer = TextNormalizer(enable_glossary=True)
    normalizer.load()
    glossary = Path(model_dir) / "glossary.yaml"
    if glossary.is_file():
        normalizer.load_glossary_from_yaml(str(glossary))
    return TextTokenizer(str(model_file(model_dir, cfg.dataset["bpe_model"])), normalizer)


def build_unified_voice(cfg: Any, **overrides: Any) -> torch.nn.Module:
    """A fresh UnifiedVoice from the ``gpt:`` section (same kwargs as IndexTTS2.__init__), weights random."""
    from omegaconf import OmegaConf
    from indextts.gpt.model_v2 import UnifiedVoice

    kwargs = OmegaConf.to_container(cfg.gpt, resolve=True) if not isinstance(cfg.gpt, dict) else dict(cfg.gpt)
    kwargs.update(overrides)
    return UnifiedVoice(**kwargs)


def load_gpt_state_dict(model_dir: str | os.PathLike, cfg: Any = None) -> dict[str, torch.Tensor]:
    """gpt.pth as upstream's load_checkpoint reads it (a bare state dict, or one under 'model')."""
    cfg = cfg if cfg is not None else load_config(model_dir)
    state = torch.load(model_file(model_dir, cfg.gpt_checkpoint), map_location="cpu", weights_only=True)
    return state["model"] if "model" in state else state


def load_unified_voice(model_dir: str | os.PathLike, cfg: Any = None, **overrides: Any) -> torch.nn.Module:
    """UnifiedVoice with gpt.pth loaded strictly, before post_init_gpt2_config (the order IndexTTS2 uses)."""
    cfg = cfg if cfg is not None else load_config(model_dir)
    model = build_unified_voice(cfg, **overrides)
    model.load_state_dict(load_gpt_state_dict(model_dir, cfg), strict=True)
    return model


def load_feature_extractor(model_dir: str | os.PathLike) -> Any:
    """SeamlessM4TFeatureExtractor of w2v-bert-2.0 (80 fbank x stride 2 = 160-d input_features at 16 kHz)."""
    from transformers import SeamlessM4TFeatureExtractor

    return SeamlessM4TFeatureExtractor.from_pretrained(
        str(resolve_hub_snapshot(model_dir, W2V_BERT_REPO, ("preprocessor_config.json",))))


def load_semantic_model(model_dir: str | os.PathLike, cfg: Any = None) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """Wav2Vec2BertModel + the (mean, std) of its layer-17 states, as upstream build_semantic_model returns."""
    from transformers import Wav2Vec2BertModel

    cfg = cfg if cfg is not None else load_config(model_dir)
    folder = resolve_hub_snapshot(model_dir, W2V_BERT_REPO, ("config.json",))
    model = Wav2Vec2BertModel.from_pretrained(str(folder), torch_dtype=torch.float32).eval()
    stats = torch.load(model_file(model_dir, cfg.w2v_stat), map_location="cpu", weights_only=True)
    return model, stats["mean"], torch.sqrt(stats["var"])


def load_semantic_codec(model_dir: str | os.PathLike, cfg: Any = None) -> torch.nn.Module:
    """MaskGCT RepCodec (upstream build_semantic_codec) with the dir's semantic_codec/model.safetensors."""
    import safetensors.torch
    from indextts.utils.maskgct_utils import build_semantic_codec

    cfg = cfg if cfg is not None else load_config(model_dir)
    codec = build_semantic_codec(cfg.semantic_codec)
    safetensors.torch.load_model(codec, str(resolve_hub_file(model_dir, MASKGCT_REPO, SEMANTIC_CODEC_FILE)))
    return codec.eval()


def load_campplus(model_dir: str | os.PathLike) -> torch.nn.Module:
    """CAMPPlus speaker-style encoder (192-d); optional campplus_config.json beside the .bin sizes a tiny one."""
    from indextts.s2mel.modules.campplus.DTDNN import CAMPPlus

    path = resolve_hub_file(model_dir, CAMPPLUS_REPO, CAMPPLUS_FILE)
    kwargs: dict[str, Any] = {"feat_dim": 80, "embedding_size": 192}  # what IndexTTS2.__init__ passes
    extra = path.parent / CAMPPLUS_CONFIG_FILE
    if extra.is_file():
        kwargs.update(json.loads(extra.read_text()))
    model = CAMPPlus(**kwargs)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def build_s2mel(cfg: Any, gpt_dim: int | None = None) -> torch.nn.Module:
    """Upstream s2mel MyModel(use_gpt_latent=True), its gpt_layer sized to the GPT's model_dim.

    Upstream hard-codes gpt_layer's input as 1280 (the real GPT width); a GPT of another width (our tiny
    checkpoint) gets a first Linear of its own width. For the real checkpoint this is a no-op.
    """
    from indextts.s2mel.modules.commons import MyModel

    s2mel = MyModel(cfg.s2mel, use_gpt_latent=True)
    gpt_dim = int(gpt_dim if gpt_dim is not None else cfg.gpt.model_dim)
    first = s2mel.models["gpt_layer"][0]
    if first.in_features != gpt_dim:
        s2mel.models["gpt_layer"][0] = torch.nn.Linear(gpt_dim, first.out_features)
    return s2mel


def load_s2mel(model_dir: str | os.PathLike, cfg: Any = None) -> torch.nn.Module:
    """s2mel (length regulator + CFM/DiT + gpt_layer) with s2mel.pth, via upstream's load_checkpoint2."""
    from indextts.s2mel.modules.commons import load_checkpoint2

    cfg = cfg if cfg is not None else load_config(model_dir)
    s2mel = build_s2mel(cfg)
    s2mel, _, _, _ = load_checkpoint2(s2mel, None, str(model_file(model_dir, cfg.s2mel_checkpoint)),
                                      load_only_params=True, ignore_modules=[], is_distributed=False)
    return s2mel.eval()


def load_bigvgan(model_dir: str | os.PathLike, cfg: Any = None) -> torch.nn.Module:
    """BigVGAN vocoder (cfg.vocoder.name) from its local snapshot folder, weight norm removed as upstream does."""
    from indextts.s2mel.modules.bigvgan import bigvgan

    cfg = cfg if cfg is not None else load_config(model_dir)
    folder = resolve_hub_snapshot(model_dir, str(cfg.vocoder.name), ("config.json", "bigvgan_generator.pt"))
    model = bigvgan.BigVGAN.from_pretrained(str(folder), use_cuda_kernel=False)
    model.remove_weight_norm()
    return model.eval()


def load_emotion_matrices(model_dir: str | os.PathLike, cfg: Any = None) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """(emo_matrix, spk_matrix) split by cfg.emo_num, as IndexTTS2.__init__ keeps them (feat2.pt, feat1.pt)."""
    cfg = cfg if cfg is not None else load_config(model_dir)
    emo = torch.load(model_file(model_dir, cfg.emo_matrix), map_location="cpu", weights_only=True)
    spk = torch.load(model_file(model_dir, cfg.spk_matrix), map_location="cpu", weights_only=True)
    sizes = list(cfg.emo_num)
    return torch.split(emo, sizes), torch.split(spk, sizes)
