"""Move adapters to and from PEFT's LoRA directory format, with identical outputs; no peft import.

A PEFT LoRA directory holds `adapter_config.json` and `adapter_model.safetensors` (or `.bin`) with keys
    base_model.model.<path>.lora_A.weight [r, in]    base_model.model.<path>.lora_B.weight [out, r]
    base_model.model.<path>.lora_embedding_A [r, num] base_model.model.<path>.lora_embedding_B [dim, r]
which is our orientation for every base kind, so tensors move unchanged. PEFT computes each module's
scale as alpha / r (alpha / sqrt(r) with use_rslora), taking r and alpha from rank_pattern /
alpha_pattern (regex keys matched as `(.*\\.)?(key)$`, first match wins) or the r / lora_alpha defaults.
transformers Conv1D targets need `fan_in_fan_out: true`.
"""
from __future__ import annotations

import collections
import json
import math
import re
from pathlib import Path
from typing import Any, Mapping

import safetensors.torch
import torch
from torch import Tensor, nn

from .adapter_io import (AdapterFileError, _few, _glob_escape, alpha_for, base_kind, check_new_name, check_targets,
                         install_adapter, resolve_adapter)
from .atomic import atomic_write_bytes
from .spec import LoRASpec

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
_SUFFIXES = {  # key suffix -> (A or B, is an embedding)
    ".lora_A.weight": ("A", False), ".lora_B.weight": ("B", False),
    ".lora_embedding_A": ("A", True), ".lora_embedding_B": ("B", True),
}
# Config features whose adapters are not a plain LoRA delta on the base: refused on import.
_UNSUPPORTED = {
    "use_dora": "DoRA rescales the base weight",
    "lora_bias": "a bias on lora_B",
    "modules_to_save": "full copies of base modules",
    "target_parameters": "LoRA on raw parameters",
    "layer_replication": "replicated layers",
    "trainable_token_indices": "trained token embeddings",
    "alora_invocation_tokens": "activated LoRA (applies only after invocation tokens)",
    "use_qalora": "QA-LoRA",
}


# ---- export --------------------------------------------------------------------------------------
def export_peft(model: nn.Module, out_dir: str | Path, adapter: str | Mapping[str, float] | None = "default") -> Path:
    """Write `adapter` (a name, a {name: weight} blend, or None for the active blend) as a PEFT LoRA directory.

    Real peft loads it onto the same base (`PeftModel.from_pretrained(base, out_dir)`) with the same
    outputs. A blend is written in its exact stacked-rank form (scale 1). Files are written atomically.
    """
    name, spec, targets, _ = resolve_adapter(model, adapter)
    kinds = {p: base_kind(model.get_submodule(p)) for p in targets}
    ranks = {p: A.shape[0] for p, (A, _, _) in targets.items()}
    alphas = {p: alpha_for(spec, p, ranks[p], s) for p, (_, _, s) in targets.items()}
    r, alpha = _most_common(ranks.values()), _most_common(alphas.values())
    by_length = sorted(targets, key=len, reverse=True)  # longest first: a path that ends another can't take its value
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
        "r": r, "lora_alpha": _plain(alpha), "lora_dropout": spec.dropout, "use_rslora": spec.use_rslora,
        "target_modules": _peft_targets(model, list(targets)),
        "rank_pattern": {re.escape(p): ranks[p] for p in by_length if ranks[p] != r},
        "alpha_pattern": {re.escape(p): _plain(alphas[p]) for p in by_length if alphas[p] != alpha},
        "fan_in_fan_out": any(k == "Conv1D" for k in kinds.values()),
        "bias": "none", "modules_to_save": None, "init_lora_weights": True, "use_dora": False,
    }
    tensors = {}
    for p, (A, B, _) in targets.items():
        a, b = ("lora_embedding_A", "lora_embedding_B") if kinds[p] == "Embedding" else ("lora_A.weight", "lora_B.weight")
        tensors[f"{PREFIX}{p}.{a}"] = A.detach().to("cpu", copy=True).contiguous()
        tensors[f"{PREFIX}{p}.{b}"] = B.detach().to("cpu", copy=True).contiguous()
    bad = [k for k, t in tensors.items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"refusing to export NaN/inf values in {_few(bad)}; nothing was written")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / SAFETENSORS_NAME, safetensors.torch.save(tensors, metadata={
        "format": "pt", "lora_engine_adapter": name}))
    atomic_write_bytes(out / CONFIG_NAME, (json.dumps(config, indent=2) + "\n").encode())
    return out


def _peft_targets(model: nn.Module, paths: list[str]) -> list[str] | str:
    """The exact paths as a list (PEFT matches `key == t or key.endswith('.' + t)`), or, when that would
    also catch an untargeted module whose path ends with one of them, a regex PEFT full-matches."""
    chosen = set(paths)
    overreach = [k for k, _ in model.named_modules() if k not in chosen and any(k.endswith("." + p) for p in paths)]
    if not overreach:
        return sorted(paths)
    return "|".join(re.escape(p) for p in sorted(paths))


def _most_common(values) -> Any:
    return collections.Counter(values).most_common(1)[0][0]


def _plain(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


# ---- import --------------------------------------------------------------------------------------
def import_peft(model: nn.Module, peft_dir: str | Path, adapter: str = "default") -> str:
    """Read a PEFT LoRA directory into the model as adapter `adapter`, with PEFT's outputs; returns the name.

    Reads adapter_model.safetensors, or adapter_model.bin through torch.load(weights_only=True) only
    (no arbitrary unpickling). PEFT files carry no base fingerprint: only module paths and shapes are
    checked. Refuses configs that are not a plain LoRA delta (DoRA, bias training, modules_to_save, ...).
    The model is unchanged when anything is refused.
    """
    peft_dir = Path(peft_dir)
    config = _read_config(peft_dir)
    check_new_name(model, adapter)
    tensors, source = _read_weights(peft_dir)
    pairs: dict[str, dict[str, Any]] = {}
    unknown = []
    for key, t in tensors.items():
        hit = next(((sfx, v) for sfx, v in _SUFFIXES.items() if key.startswith(PREFIX) and key.endswith(sfx)), None)
        if hit is None:
            unknown.append(key)
            continue
        path = key[len(PREFIX):-len(hit[0])]
        slot, emb = hit[1]
        entry = pairs.setdefault(path, {"embedding": emb})
        if entry["embedding"] != emb:
            unknown.append(key)
        entry[slot] = t
    if unknown:
        raise AdapterFileError(f"{source}: keys that are not plain LoRA A/B tensors: {_few(sorted(unknown))}. "
                               "Expected base_model.model.<path>.lora_A.weight / .lora_B.weight (or "
                               "lora_embedding_A / _B); base weights and DoRA magnitudes are not supported.")
    if not pairs:
        raise AdapterFileError(f"{source}: no LoRA tensors found")
    half = [p for p, e in pairs.items() if "A" not in e or "B" not in e]
    if half:
        raise AdapterFileError(f"{source}: missing lora_A or lora_B for {_few(sorted(half))}")
    r_default, alpha_default = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    targets, wanted, alphas = {}, {}, {}
    for path, e in pairs.items():
        A, B = e["A"], e["B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise AdapterFileError(f"{source}: {path}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} are not "
                                   "[r, in] and [out, r] with the same r")
        r, r_cfg = A.shape[0], _pattern_value(config.get("rank_pattern") or {}, path, r_default)
        if r != r_cfg:
            raise AdapterFileError(f"{source}: {path}: the tensors have rank {r} but {CONFIG_NAME} gives rank {r_cfg}")
        alpha = alphas[path] = float(_pattern_value(config.get("alpha_pattern") or {}, path, alpha_default))
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        if not (A.is_floating_point() and B.is_floating_point()):
            raise AdapterFileError(f"{source}: {path}: lora tensors must be floating point")
        targets[path] = (A, B, scale)
        wanted[path] = (("Embedding",) if e["embedding"] else ("Linear", "Conv1D"), A.shape[1], B.shape[0])
    non_finite = [p for p, (A, B, _) in targets.items() if not bool(torch.isfinite(A).all() and torch.isfinite(B).all())]
    if non_finite:
        raise AdapterFileError(f"{source}: NaN/inf values in the adapter of {_few(non_finite)}")
    check_targets(model, wanted, source=str(source))
    spec = LoRASpec([_glob_escape(p) for p in targets], rank=r_default, alpha=alpha_default,
                    dropout=float(config.get("lora_dropout") or 0.0), use_rslora=bool(config.get("use_rslora")),
                    rank_pattern={_glob_escape(p): A.shape[0] for p, (A, _, _) in targets.items()
                                  if A.shape[0] != r_default},
                    alpha_pattern={_glob_escape(p): a for p, a in alphas.items() if a != alpha_default})
    install_adapter(model, adapter, spec, targets, metadata={"peft_config": config, "source": str(source)})
    return adapter


def _pattern_value(patterns: Mapping[str, Any], path: str, default: Any) -> Any:
    """PEFT's get_pattern_key: the first key k with re.match(rf"(.*\\.)?({k})$", path) gives the value."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _read_config(peft_dir: Path) -> dict[str, Any]:
    path = peft_dir / CONFIG_NAME
    if not path.is_file():
        raise AdapterFileError(f"{peft_dir}: no {CONFIG_NAME}; import_peft takes a PEFT adapter directory "
                               "(lora_engine's own .safetensors files load with load_adapter)")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFileError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(config, dict) or str(config.get("peft_type", "")).upper() != "LORA":
        found = config.get("peft_type") if isinstance(config, dict) else config
        raise AdapterFileError(f"{path}: peft_type is {found!r}; only LORA adapters can be imported")
    used = [f"{k} ({why})" for k, why in _UNSUPPORTED.items() if config.get(k)]
    if config.get("bias", "none") not in (None, "none"):
        used.append(f"bias={config['bias']!r} (trained base biases)")
    init = str(config.get("init_lora_weights", True)).lower()
    if any(init.startswith(m) for m in ("pissa", "olora", "corda")):
        used.append(f"init_lora_weights={config['init_lora_weights']!r} (needs the residual base it was made with)")
    if used:
        raise AdapterFileError(f"{path}: this PEFT adapter is not a plain LoRA delta: {', '.join(used)}. "
                               "lora_engine imports plain LoRA only.")
    return config


def _read_weights(peft_dir: Path) -> tuple[dict[str, Tensor], Path]:
    st, pt = peft_dir / SAFETENSORS_NAME, peft_dir / BIN_NAME
    if st.is_file():
        try:
            return safetensors.torch.load(st.read_bytes()), st
        except Exception as e:
            raise AdapterFileError(f"{st}: cannot read it ({e}); the file is truncated or corrupt") from e
    if pt.is_file():
        try:  # weights_only: plain tensors and containers only, never arbitrary objects
            data = torch.load(pt, map_location="cpu", weights_only=True)
        except Exception as e:
            raise AdapterFileError(f"{pt}: refused by torch.load(weights_only=True) ({type(e).__name__}: "
                                   f"{str(e)[:300]}); only plain tensor files are read") from e
        if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in data.items()):
            raise AdapterFileError(f"{pt}: expected a dict of name -> tensor, found {type(data).__name__}")
        return data, pt
    raise AdapterFileError(f"{peft_dir}: neither {SAFETENSORS_NAME} nor {BIN_NAME} found")
