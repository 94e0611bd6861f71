"""Where LoRA goes in UnifiedVoice: named presets over the GPT's module paths.

The GPT blocks are transformers Conv1D: gpt.h.N.attn.c_attn [D, 3D] (q|k|v fused), attn.c_proj [D, D],
mlp.c_fc [D, 4D], mlp.c_proj [4D, D]. Never blanket-target every Linear: each conformer conditioning encoder
has a huge `embed.out.0` (134M parameters at full size) that a voice adapter has no business touching.
"""
from __future__ import annotations

GPT_ATTN = ["gpt.h.*.attn.c_attn", "gpt.h.*.attn.c_proj"]
GPT_MLP = ["gpt.h.*.mlp.c_fc", "gpt.h.*.mlp.c_proj"]
PRESETS = {"gpt-attn-mlp": GPT_ATTN + GPT_MLP, "gpt-attn": GPT_ATTN}
ADDONS = {"heads": ["text_head", "mel_head"], "embeddings": ["text_embedding", "mel_embedding"]}
DEFAULT_PRESET = "gpt-attn-mlp"


def preset_targets(name: str) -> list[str]:
    """Patterns of a preset such as "gpt-attn-mlp", "gpt-attn+heads" or "gpt-attn-mlp+heads+embeddings"."""
    base, *addons = name.split("+")
    if base not in PRESETS or any(a not in ADDONS for a in addons):
        raise ValueError(f"unknown target preset {name!r}: use one of {sorted(PRESETS)} optionally followed by "
                         f"{['+' + a for a in ADDONS]}, e.g. 'gpt-attn-mlp+heads'")
    return PRESETS[base] + [p for a in addons for p in ADDONS[a]]


def expand_targets(entries: list[str]) -> list[str]:
    """Target list where preset names are replaced by their patterns (plain patterns pass through)."""
    out: list[str] = []
    for entry in entries:
        is_preset = entry.split("+")[0] in PRESETS
        out.extend(preset_targets(entry) if is_preset else [entry])
    return list(dict.fromkeys(out))
