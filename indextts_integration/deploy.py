"""Deploying voice adapters: a merged gpt.pth for stock IndexTTS2, or live adapters/blends on an instance.

Live path traps handled here:
- post_init_gpt2_config builds `inference_model` around the *same* GPT blocks, embeddings and heads, so a LoRA
  wrapper put into `tts.gpt` is seen by generation too (inject_lora replaces a shared module at every parent).
- With `use_fp16`, IndexTTS2 `.half()`s the GPT before post_init: adapters trained on the fp32 base are checked
  against the fp16 rounding of that base (adapter files carry both fingerprints) and run in fp16.
- With `use_accel`, post_init *copies* the GPT blocks into a flash-attn engine (load_state_dict strict=False)
  that runs under CUDA graphs: unmerged LoRA never reaches it. There we merge in place and copy the merged
  blocks into the engine's own tensors (same storage, so its captured graphs see the new weights).
- DeepSpeed kernel injection replaces the GPT blocks with fused kernels that have no place for an adapter:
  refused with a pointer to scripts/merge.py.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from lora_engine import adapter_names, load_adapter, lora_layers, merge, set_blend, unmerge
from lora_engine.adapter_io import META_KEY
from lora_engine.atomic import atomic_open, atomic_write_bytes

LICENSE_NOTICE = (
    "This checkpoint contains IndexTTS2 weights modified by LoRA adapters. It is a Derivative Work of IndexTTS2 "
    "under the bilibili Model Use License: use and distribution are subject to that license's terms.")


class RuntimeAdapterError(RuntimeError):
    """This IndexTTS2 backend cannot take adapters at runtime."""


def parse_adapter_args(items: Sequence[str]) -> list[tuple[str, float]]:
    """["a.safetensors:0.7", "b.safetensors"] -> [("a.safetensors", 0.7), ("b.safetensors", 1.0)]."""
    out = []
    for item in items:
        path, sep, weight = item.rpartition(":")
        if not sep or not _is_float(weight):
            path, weight = item, "1.0"
        out.append((path, float(weight)))
    return out


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def load_adapters(gpt: nn.Module, adapters: Sequence[tuple[str | os.PathLike, float]],
                  strict_base: bool = True) -> dict[str, float]:
    """Load adapter files into a UnifiedVoice; returns {name: weight}.

    Each adapter keeps the name stored in its file (train.py's --adapter-name); when that name is already
    taken (e.g. two files both called "adapter"), the file stem is used, then stem_2, stem_3, ...
    """
    blend: dict[str, float] = {}
    for path, weight in adapters:
        taken = set(adapter_names(gpt)) | set(blend)
        name = _free_name([_name_in_file(path), Path(path).stem.replace(".", "_")], taken)
        load_adapter(gpt, path, adapter=name, strict_base=strict_base)
        blend[name] = float(weight)
    return blend


def _name_in_file(path: str | os.PathLike) -> str | None:
    """The adapter name in a file's header (header only), None when unreadable (load_adapter then says why)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            name = json.loads((f.metadata() or {})[META_KEY])["adapter"]
    except Exception:  # noqa: BLE001 - a bad file is reported by load_adapter with the full reason
        return None
    return name if isinstance(name, str) and name and "." not in name else None


def _free_name(candidates: Sequence[str | None], taken: set[str]) -> str:
    """The first candidate not taken, else the last one with the smallest free _2, _3, ... suffix."""
    names = [c for c in candidates if c]
    for name in names:
        if name not in taken:
            return name
    stem, k = names[-1], 2
    while f"{stem}_{k}" in taken:
        k += 1
    return f"{stem}_{k}"


# ---- merged gpt.pth --------------------------------------------------------------------------------------
def merged_state_dict(gpt: nn.Module, base_keys: Sequence[str], blend: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """The UnifiedVoice state dict with `blend` merged in, restricted to the keys of the original gpt.pth."""
    # Upstream trap: gpt.pth is UnifiedVoice's state_dict from BEFORE post_init_gpt2_config, which adds alias
    # keys (inference_model.*, gpt.wte); keeping exactly the original keys keeps it strict-loadable.
    merge(gpt, blend)
    try:
        state = gpt.state_dict()
        return {k: state[k].detach().clone() for k in base_keys}
    finally:
        unmerge(gpt)


def write_merged_gpt(model_dir: str | os.PathLike, adapters: Sequence[tuple[str | os.PathLike, float]],
                     output: str | os.PathLike, write_config: bool = False, strict_base: bool = True) -> Path:
    """Merge adapters into the model dir's gpt.pth and write it (atomically) to `output`; returns its path.

    Only targeted tensors change; keys, shapes and dtypes are those of the original file, so stock
    IndexTTS2 loads it with load_state_dict(strict=True). With `write_config`, a config.yaml pointing at it
    is written next to it (other files are referenced relative to the model dir).
    """
    from indextts_integration import model_dir as md

    cfg = md.load_config(model_dir)
    original = md.load_gpt_state_dict(model_dir, cfg)
    gpt = md.build_unified_voice(cfg)
    gpt.load_state_dict(original, strict=True)
    gpt.to(next(iter(original.values())).dtype)
    blend = load_adapters(gpt, adapters, strict_base=strict_base)
    state = merged_state_dict(gpt, list(original), blend)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(output) as f:
        torch.save(state, f)
    atomic_write_bytes(output.parent / (output.name + ".LICENSE.txt"), (LICENSE_NOTICE + "\n").encode())
    if write_config:
        _write_config(model_dir, cfg, output)
    return output


def _write_config(model_dir: str | os.PathLike, cfg: Any, gpt_path: Path) -> Path:
    """A copy of config.yaml whose gpt_checkpoint points at the merged file.

    IndexTTS2 resolves every file in the config relative to its `model_dir` argument, so only gpt_checkpoint
    changes: use it as IndexTTS2(cfg_path=<this file>, model_dir=<the model dir>). The user's own
    config.yaml is never overwritten.
    """
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(OmegaConf.to_container(cfg))
    cfg.gpt_checkpoint = os.path.relpath(gpt_path.resolve(), Path(model_dir).resolve())
    in_model_dir = gpt_path.parent.resolve() == Path(model_dir).resolve()
    target = gpt_path.parent / (f"config_{gpt_path.stem}.yaml" if in_model_dir else "config.yaml")
    atomic_write_bytes(target, OmegaConf.to_yaml(cfg).encode())
    return target


# ---- live instance ---------------------------------------------------------------------------------------
def _check_backend(tts: Any) -> None:
    # Upstream trap (use_deepspeed): post_init hands inference_model to deepspeed.init_inference with kernel
    # injection, which swaps the GPT blocks for fused kernels; a LoRA wrapper or a merged weight never reaches them.
    if getattr(tts.gpt, "ds_engine", None) is not None:
        raise RuntimeAdapterError(
            "this IndexTTS2 instance runs the GPT through DeepSpeed kernel injection, whose fused blocks cannot "
            "take adapters at runtime. Merge the adapter into a gpt.pth instead: python scripts/merge.py "
            "--model-dir checkpoints --adapter voice.safetensors --output checkpoints/gpt_voice.pth --write-config")


def _accel_model(tts: Any) -> nn.Module | None:
    engine = getattr(tts.gpt, "accel_engine", None)
    return getattr(engine, "model", None) if engine is not None else None


def _mirror_into_accel(tts: Any) -> None:
    """Copy every adapted GPT block weight into the accel engine's own copy, in place.

    Upstream trap (use_accel): post_init COPIES the blocks into GPT2AccelModel (load_state_dict strict=False) and
    captures CUDA graphs on those tensors, so we write into the same storage. Heads and norms are not copied
    (the engine's lm_head shares final_norm/mel_head), and merging in place already updates them.
    """
    accel = _accel_model(tts)
    if accel is None:
        return
    own = dict(accel.named_parameters())
    with torch.no_grad():
        for path, layer in lora_layers(tts.gpt).items():
            if path.startswith("gpt."):
                own[path[len("gpt."):] + ".weight"].copy_(layer.weight)


def apply_adapter(tts: Any, adapters: str | os.PathLike | Sequence[tuple[str | os.PathLike, float]],
                  strict_base: bool = True) -> dict[str, float]:
    """Load one adapter file (or [(path, weight), ...]) into a live IndexTTS2 and make it the voice."""
    _check_backend(tts)
    items = [(adapters, 1.0)] if isinstance(adapters, (str, os.PathLike)) else list(adapters)
    if _accel_model(tts) is not None:
        unmerge(tts.gpt)  # adapters are loaded into the unmerged base, then merged below
    blend = load_adapters(tts.gpt, items, strict_base=strict_base)
    set_voice_blend(tts, blend)
    return blend


def set_voice_blend(tts: Any, weights: Mapping[str, float | torch.Tensor]) -> None:
    """Switch or blend voices on a live IndexTTS2 without reloading: {"alice": .6, "bob": .4}; {} = base voice."""
    _check_backend(tts)
    if _accel_model(tts) is None:
        set_blend(tts.gpt, weights)  # unmerged: exact, and per-row tensor weights work here
        return
    if any(isinstance(w, torch.Tensor) for w in weights.values()):
        raise RuntimeAdapterError("per-row blend weights need the unmerged path; the accel engine runs merged "
                                  "weights. Build IndexTTS2 with use_accel=False for per-row mixing.")
    unmerge(tts.gpt)
    set_blend(tts.gpt, weights)
    if weights:
        merge(tts.gpt)
    _mirror_into_accel(tts)


def load_indextts2(model_dir: str | os.PathLike, lora_path: str | os.PathLike | Sequence[tuple[str, float]] | None = None,
                   device: str = "cpu", use_fp16: bool = False, use_accel: bool = False,
                   use_deepspeed: bool = False, strict_base: bool = True) -> Any:
    """IndexTTS2 from a model dir (no download), with one adapter or a weighted blend of several applied.

    `lora_path`: an adapter file, or [(path, weight), ...]. Voices can be switched later without reloading
    with set_voice_blend(tts, {...}) (names: see load_adapters).
    """
    from indextts_integration.upstream_tts import build_indextts2

    tts = build_indextts2(model_dir, device=device, use_fp16=use_fp16, use_accel=use_accel,
                          use_deepspeed=use_deepspeed)
    if lora_path is not None:
        apply_adapter(tts, lora_path, strict_base=strict_base)
    return tts
