"""Adapter files: one .safetensors holding a LoRA adapter, with a JSON header that says what it is.

Tensors: `<module path>.lora_A` [r, in] and `<module path>.lora_B` [out, r] (PEFT orientation for every
base kind; for an Embedding `in` is num_embeddings and `out` the embedding dim), plus `extra.<name>` for
tensors carried alongside (e.g. a learned speaker latent). The safetensors metadata holds one key,
"lora_engine", a JSON document:

    format, format_version, adapter, spec       what it is and how it was made (LoRASpec.to_dict())
    targets {path: base_kind, base_shape, base_dtype, in_features, out_features, rank, alpha, scale}
    base_fingerprint                            sha256 of each targeted module's base weight/bias
    tensors_sha256                              checksum of the tensors in this file (catches corruption)
    training_summary, provenance, extra_tensors

Print it with `python -m lora_engine.adapter_io FILE`. Loading never unpickles anything, checks the file
completely before touching the model, and leaves the model unchanged when it refuses.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import safetensors.torch
import torch
from torch import Tensor, nn

from .atomic import atomic_write_bytes
from .blend import get_blend
from .inject import _unwrap, adapter_names, adapter_specs, inject_lora, lora_layers, remove_adapter
from .layers import LoRAConv1D, LoRAEmbedding, LoRALayer, LoRALinear, lora_class_for
from .merge import base_weight
from .spec import LoRASpec, closest_names

FORMAT = "lora_engine.adapter"
FORMAT_VERSION = 1
META_KEY = "lora_engine"
EXTRA_PREFIX = "extra."
_MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit
_KINDS = {LoRALinear: "Linear", LoRAConv1D: "Conv1D", LoRAEmbedding: "Embedding"}
_LOADED_ATTR = "_lora_loaded"  # on the root module: {adapter: {"metadata", "extra", "marker"}}
# An fp32 base is also fingerprinted as its fp16/bf16 roundings: IndexTTS2 deploys with .half().
_ALSO_AS = {torch.float32: (torch.float16, torch.bfloat16)}

Targets = dict[str, tuple[Tensor, Tensor, float]]  # module path -> (A [r, in], B [out, r], scale)


class AdapterFileError(ValueError):
    """The file is not a usable adapter for this model. The model was not changed."""


class BaseMismatchError(AdapterFileError):
    """The adapter was made for a different base model: its base fingerprint does not match."""


# ---- fingerprints --------------------------------------------------------------------------------
def tensors_sha256(tensors: Mapping[str, Tensor], cast: torch.dtype | None = None) -> str:
    """sha256 over (name, dtype, shape, raw bytes) of each tensor in name order; `cast` hashes a rounding."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        if cast is not None and t.is_floating_point():
            t = t.to(cast)
        t = t.cpu().contiguous()
        h.update(f"{name}|{_dtype_name(t.dtype)}|{list(t.shape)}\n".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def base_tensors(module: nn.Module) -> dict[str, Tensor]:
    """A target module's base weight (and bias), without any merged delta; the model is not changed."""
    weight = base_weight(module) if isinstance(module, LoRALayer) else module.weight
    out = {"weight": weight}
    if isinstance(getattr(module, "bias", None), Tensor):
        out["bias"] = module.bias
    return out


def module_fingerprint(module: nn.Module) -> dict[str, str]:
    """{dtype: sha256} of the module's base tensors: its own dtype first, then (fp32 only) fp16 and bf16."""
    tensors = base_tensors(module)
    dtype = tensors["weight"].dtype
    out = {_dtype_name(dtype): tensors_sha256(tensors)}
    for other in _ALSO_AS.get(dtype, ()):
        out[_dtype_name(other)] = tensors_sha256(tensors, cast=other)
    return out


def base_fingerprint(model: nn.Module, paths: Sequence[str]) -> dict[str, Any]:
    """The fingerprint of the base tensors of the modules at `paths` (works on a merged model too).

    Costs one pass over those weights (three for fp32); a training loop saving often can compute it once
    and pass it to save_adapter(fingerprint=...).
    """
    return _fingerprint_doc({p: module_fingerprint(model.get_submodule(p)) for p in paths})


def _fingerprint_doc(modules: dict[str, dict[str, str]]) -> dict[str, Any]:
    """The header's fingerprint: per-module hashes plus one sha256 over all of them (in their own dtype)."""
    whole = hashlib.sha256("".join(f"{p} {next(iter(m.values()))}\n" for p, m in sorted(modules.items())).encode())
    return {"algorithm": "sha256 of each module's base weight and bias: name, dtype, shape, raw bytes",
            "sha256": whole.hexdigest(), "modules": modules}


def check_base(model: nn.Module, fingerprint: Mapping[str, Any], strict: bool = True, source: str = "adapter") -> None:
    """Compare a file's base fingerprint with the model's base; raise BaseMismatchError (or warn) naming modules.

    A module is compared in the model's dtype when the file has that rounding, else in the file's dtype.
    """
    differ = []
    for path, entry in fingerprint["modules"].items():
        tensors = base_tensors(model.get_submodule(path))
        dtype = _dtype_name(tensors["weight"].dtype)
        if dtype in entry:
            same = tensors_sha256(tensors) == entry[dtype]
        else:
            dtype = next(iter(entry))
            same = tensors_sha256(tensors, cast=_dtype(dtype)) == entry[dtype]
        if not same:
            differ.append(f"{path} (compared as {dtype})")
    if not differ:
        return
    total = len(fingerprint["modules"])
    msg = (f"{source}: base fingerprint mismatch on {len(differ)} of {total} targeted modules: "
           f"{_few(differ)}. The adapter was made for a different base model (or a different precision of it).")
    if strict:
        raise BaseMismatchError(msg + " Load the base it was trained on, or pass strict_base=False to apply it "
                                      "anyway. The model was not changed.")
    warnings.warn(msg + " Applying it anyway (strict_base=False).", stacklevel=3)


# ---- reading -------------------------------------------------------------------------------------
def read_adapter_file(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read and fully check an adapter file: (tensors by key, the "lora_engine" header document).

    Raises AdapterFileError for anything that is not a complete, consistent lora_engine adapter.
    """
    path = Path(path)
    header = _read_safetensors_header(path)
    meta = header.get("__metadata__") or {}
    if META_KEY not in meta:
        raise AdapterFileError(f"{path}: a safetensors file, but not a lora_engine adapter (no {META_KEY!r} "
                               "metadata). A PEFT adapter directory loads with import_peft.")
    try:
        doc = json.loads(meta[META_KEY])
    except json.JSONDecodeError as e:
        raise AdapterFileError(f"{path}: the {META_KEY!r} header is not valid JSON ({e}); the file is corrupt") from e
    _check_doc(doc, path)
    try:
        tensors = safetensors.torch.load(path.read_bytes())
    except Exception as e:  # safetensors raises its own SafetensorError
        raise AdapterFileError(f"{path}: cannot read the tensors ({e}); the file is truncated or corrupt") from e
    _check_tensors(tensors, doc, path)
    return tensors, doc


def _read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header, refusing anything else (a pickle is never unpickled) before reading the data."""
    if path.is_dir():
        raise AdapterFileError(f"{path} is a directory; a PEFT adapter directory loads with import_peft")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= n <= min(size - 8, _MAX_HEADER_BYTES):
            raise AdapterFileError(f"{path} is not a safetensors adapter file{_what_is(head)}: its first bytes "
                                   f"do not give a valid header length (file is {size} bytes). Adapter files "
                                   "are written by save_adapter; nothing was loaded.")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFileError(f"{path}: the safetensors header is not valid JSON ({e}); the file is corrupt "
                               "or not a safetensors file") from e
    if not isinstance(header, dict):
        raise AdapterFileError(f"{path}: the safetensors header is not a JSON object; the file is corrupt")
    return header


def _what_is(head: bytes) -> str:
    if head.startswith(b"PK"):
        return " (it is a zip archive, as torch.save writes)"
    if head[:1] == b"\x80":
        return " (it is a Python pickle; it will not be unpickled, which could run code)"
    if head.lstrip()[:1] in (b"{", b"["):
        return " (it is JSON; for a PEFT adapter_config.json use import_peft on its directory)"
    return ""


def _check_doc(doc: Any, path: Path) -> None:
    def bad(what: str) -> AdapterFileError:
        return AdapterFileError(f"{path}: malformed {META_KEY!r} header: {what}")

    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise bad(f"expected format {FORMAT!r}, found {doc.get('format') if isinstance(doc, dict) else doc!r}")
    version = doc.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise bad(f"format_version must be a positive integer, found {version!r}")
    if version > FORMAT_VERSION:
        raise AdapterFileError(f"{path}: written by a newer lora_engine (format_version {version}; this one reads "
                               f"up to {FORMAT_VERSION}). Upgrade lora_engine to load it.")
    if not isinstance(doc.get("adapter"), str):
        raise bad("'adapter' (the adapter name) is missing")
    try:
        LoRASpec.from_dict(doc.get("spec"))
    except Exception as e:
        raise bad(f"'spec' is not a valid LoRASpec ({e})") from e
    targets = doc.get("targets")
    if not isinstance(targets, dict) or not targets:
        raise bad("'targets' must be a non-empty object of module path -> description")
    for p, e in targets.items():
        ok = (isinstance(e, dict) and e.get("base_kind") in _KINDS.values()
              and all(_is_pos_int(e.get(k)) for k in ("rank", "in_features", "out_features"))
              and isinstance(e.get("scale"), (int, float)) and math.isfinite(e["scale"]))
        if not ok:
            raise bad(f"target {p!r} needs base_kind, positive rank/in_features/out_features and a finite scale; "
                      f"found {e!r}")
    fp = doc.get("base_fingerprint")
    if not isinstance(fp, dict) or not isinstance(fp.get("modules"), dict) or set(fp["modules"]) != set(targets):
        raise bad("'base_fingerprint.modules' must list exactly the targeted modules")
    if not all(isinstance(m, dict) and m and all(_is_dtype_name(k) for k in m) for m in fp["modules"].values()):
        raise bad("each 'base_fingerprint.modules' entry must map a dtype name to a sha256")
    if not isinstance(doc.get("extra_tensors", {}), dict) or not isinstance(doc.get("tensors_sha256"), str):
        raise bad("'extra_tensors' must be an object and 'tensors_sha256' a string")


def _check_tensors(tensors: dict[str, Tensor], doc: dict[str, Any], path: Path) -> None:
    targets = doc["targets"]
    expected = {f"{p}.lora_{ab}" for p in targets for ab in "AB"}
    expected |= {EXTRA_PREFIX + n for n in doc.get("extra_tensors", {})}
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise AdapterFileError(f"{path}: tensors do not match the header: missing {_few(missing)}, unexpected "
                               f"{_few(unexpected)}. The file was edited or written by another tool.")
    for p, e in targets.items():
        A, B = tensors[f"{p}.lora_A"], tensors[f"{p}.lora_B"]
        if A.dim() != 2 or B.dim() != 2:
            raise AdapterFileError(f"{path}: {p}: lora_A and lora_B must be 2-D, found {tuple(A.shape)} and "
                                   f"{tuple(B.shape)}")
        r = e["rank"]
        if A.shape[0] != r or B.shape[1] != r:
            raise AdapterFileError(f"{path}: {p}: rank differs from the header: header says rank {r}, lora_A has "
                                   f"{A.shape[0]} rows and lora_B {B.shape[1]} columns")
        want_a, want_b = (r, e["in_features"]), (e["out_features"], r)
        if tuple(A.shape) != want_a or tuple(B.shape) != want_b:
            raise AdapterFileError(f"{path}: {p}: wrong shapes: lora_A {tuple(A.shape)} and lora_B "
                                   f"{tuple(B.shape)}, the header says {want_a} and {want_b}")
    not_float = [k for k, t in tensors.items() if not t.is_floating_point()]
    if not_float:
        raise AdapterFileError(f"{path}: tensors must be floating point: {_few(not_float)}")
    if tensors_sha256(tensors) != doc["tensors_sha256"]:
        raise AdapterFileError(f"{path}: the tensor data does not match the checksum in the header; the file "
                               "is corrupt. Use the original file again.")
    non_finite = [k for k, t in tensors.items() if not bool(torch.isfinite(t).all())]
    if non_finite:
        raise AdapterFileError(f"{path}: NaN/inf values in {_few(non_finite)}; the adapter diverged in training "
                               "or was damaged. Use an earlier checkpoint.")


# ---- the model side -------------------------------------------------------------------------------
def base_kind(module: nn.Module) -> str | None:
    """'Linear', 'Conv1D' or 'Embedding' for a supported (or already wrapped) module, else None."""
    cls = type(module) if isinstance(module, LoRALayer) else lora_class_for(module)
    return _KINDS.get(cls)


def check_targets(model: nn.Module, wanted: Mapping[str, tuple[Sequence[str], int, int]], source: str) -> None:
    """Every path must exist in the model with an allowed base kind and (in, out) sizes; else one clear error.

    `wanted`: path -> (allowed kinds, in_features, out_features), in PEFT orientation.
    """
    missing, problems = [], []
    for path, (kinds, n_in, n_out) in wanted.items():
        try:
            module = model.get_submodule(path)
        except AttributeError:
            missing.append(path)
            continue
        kind = base_kind(module)
        if kind not in kinds:
            problems.append(f"{path} is a {type(module).__name__}, the adapter expects {'/'.join(kinds)}")
            continue
        sizes = _in_out(module)
        if sizes != (n_in, n_out):
            problems.append(f"{path}: the model's {kind} has (in, out) = {sizes}, the adapter expects {(n_in, n_out)}")
    if missing:
        names = [p for p, m in model.named_modules() if base_kind(m)]
        near = sorted({n for p in missing[:3] for n in closest_names(p, names, n=3)})
        raise AdapterFileError(f"{source}: {len(missing)} target module path(s) do not exist in this model: "
                               f"{_few(missing)}. Closest module names: {near}. The adapter was made for a "
                               "differently structured model. The model was not changed.")
    if problems:
        raise AdapterFileError(f"{source}: the adapter does not fit this model: {_few(problems)}. "
                               "The model was not changed.")


def _in_out(module: nn.Module) -> tuple[int, int]:
    """(in, out) in PEFT orientation: Linear weight [out, in]; Conv1D weight [in, out]; Embedding [num, dim]."""
    w = module.weight
    return (w.shape[1], w.shape[0]) if base_kind(module) == "Linear" else (w.shape[0], w.shape[1])


def install_adapter(model: nn.Module, name: str, spec: LoRASpec, targets: Targets,
                    extras: Mapping[str, Tensor] | None = None, metadata: Mapping[str, Any] | None = None) -> None:
    """Inject adapter `name` on exactly the paths of `targets` and fill in A, B and scale; all or nothing.

    Unmerged model: the adapter becomes the only active one (as inject_lora does). Merged model: the
    weights are not touched, the merged mix keeps running, and the new adapter is added inactive (a
    MergeRecord holds its own copy of what it merged, so a new adapter beside it cannot upset unmerge).
    """
    check_new_name(model, name)
    ranks = {p: A.shape[0] for p, (A, _, _) in targets.items()}
    top = max(ranks.values())
    exact = LoRASpec([_glob_escape(p) for p in targets], rank=top, dropout=spec.dropout, init=spec.init,
                     rank_pattern={_glob_escape(p): r for p, r in ranks.items() if r != top})
    before = _capture(model)
    try:
        with _merge_flags_hidden(model) as merged:
            inject_lora(model, exact, name)
            with torch.no_grad():
                for p, (A, B, scale) in targets.items():
                    layer = model.get_submodule(p)
                    layer.lora_A[name].copy_(A)
                    layer.lora_B[name].copy_(B)
                    layer.scaling[name] = float(scale)
                    layer.set_blend(dict(layer.blend))  # blend_scale caches the scales: rebuild it
            adapter_specs(model)[name] = spec
            if merged:
                for layer, blend in before["blends"]:
                    layer.set_blend(blend)
                for layer in lora_layers(model).values():
                    if layer not in before["layers"]:
                        layer.set_blend({})
        first = model.get_submodule(next(iter(targets))).lora_A[name]
        model.__dict__.setdefault(_LOADED_ATTR, {})[name] = {
            "metadata": dict(metadata or {}), "extra": dict(extras or {}), "marker": first}
    except BaseException:
        _restore(model, name, before)
        raise


def check_new_name(model: nn.Module, name: str) -> None:
    """Refuse a name inject_lora would refuse, before anything is done."""
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name {name!r} must be a non-empty string without '.'")
    if name in adapter_names(model):
        raise ValueError(f"adapter {name!r} is already in the model; pass another name (adapter=...) or "
                         f"remove_adapter(model, {name!r}) first. The model was not changed.")


def adapter_extras(model: nn.Module, adapter: str) -> dict[str, Tensor]:
    """Extra tensors (e.g. a speaker latent) that came with adapter `adapter` when it was loaded; {} if none."""
    entry = _loaded_entry(model, adapter)
    return dict(entry["extra"]) if entry else {}


def adapter_metadata(model: nn.Module, adapter: str) -> dict[str, Any]:
    """The header document adapter `adapter` was loaded with (PEFT imports: its config); {} if none."""
    entry = _loaded_entry(model, adapter)
    return dict(entry["metadata"]) if entry else {}


def _loaded_entry(model: nn.Module, adapter: str) -> dict | None:
    entry = model.__dict__.get(_LOADED_ATTR, {}).get(adapter)
    if entry is None:
        return None
    # A later remove_adapter + inject under the same name makes the record stale: it must be the same Parameter.
    alive = any(layer.lora_A.get(adapter) is entry["marker"] for layer in lora_layers(model).values()
                if adapter in layer.lora_A)
    return entry if alive else None


@contextlib.contextmanager
def _merge_flags_hidden(model: nn.Module):
    """Let inject/remove run beside a merged adapter: they never touch base weights or a MergeRecord."""
    merged = {layer: layer.merged for layer in lora_layers(model).values() if layer.merged is not None}
    for layer in merged:
        layer.merged = None
    try:
        yield bool(merged)
    finally:
        for layer, record in merged.items():
            layer.merged = record


def _capture(model: nn.Module) -> dict[str, Any]:
    layers = list(lora_layers(model).values())
    return {"layers": set(layers), "blends": [(layer, dict(layer.blend)) for layer in layers],
            "grad": {n: p.requires_grad for n, p in model.named_parameters()},
            "specs": dict(adapter_specs(model))}


def _restore(model: nn.Module, name: str, before: dict[str, Any]) -> None:
    """Undo a half-done install: remove the adapter and any wrapper it created, restore blends and flags."""
    with _merge_flags_hidden(model):
        if name in adapter_names(model):
            remove_adapter(model, name)
        for layer in list(lora_layers(model).values()):
            if layer not in before["layers"] and not layer.adapters:
                _unwrap(model, layer)
    for layer, blend in before["blends"]:
        layer.set_blend(blend)
    for n, p in model.named_parameters():
        if n in before["grad"]:
            p.requires_grad_(before["grad"][n])
    specs = adapter_specs(model)
    specs.clear()
    specs.update(before["specs"])


# ---- collecting what to save ---------------------------------------------------------------------
def adapter_targets(model: nn.Module, adapter: str) -> Targets:
    """path -> (A, B, scale) of one adapter, as stored in the model (detached, no copy)."""
    out = {p: (layer.lora_A[adapter].detach(), layer.lora_B[adapter].detach(), layer.scaling[adapter])
           for p, layer in lora_layers(model).items() if adapter in layer.lora_A}
    if not out:
        raise KeyError(f"no adapter {adapter!r} in the model; it has {adapter_names(model)}")
    return out


def stack_blend(sources: Sequence[tuple[float, Mapping[str, tuple[Tensor, Tensor, float]]]]) -> Targets:
    """One adapter equal to sum_i w_i s_i B_i A_i, exactly (no SVD): the stacked-rank form.

    A = [A_1; A_2; ...] (rank R = sum r_i), B = [w_1 s_1 B_1, w_2 s_2 B_2, ...], scale 1. The product
    w_i s_i B_i is formed in float64 and rounded once; a module missing from a source gets nothing from it.
    """
    paths = dict.fromkeys(p for _, targets in sources for p in targets)
    out: Targets = {}
    for p in paths:
        parts = [(float(w), targets[p]) for w, targets in sources if p in targets]
        dtype = parts[0][1][0].dtype
        for _, (A, B, _) in parts:
            dtype = torch.promote_types(torch.promote_types(dtype, A.dtype), B.dtype)
        A = torch.cat([A.to(dtype) for _, (A, _, _) in parts], 0)
        B = torch.cat([(B.double() * (w * s)).to(dtype) for w, (_, B, s) in parts], 1)
        out[p] = (A, B, 1.0)
    return out


def resolve_adapter(model: nn.Module, adapter: str | Mapping[str, float] | None
                    ) -> tuple[str, LoRASpec, Targets, dict[str, Any] | None]:
    """(name, spec, targets, blend provenance) for one adapter name, or for a {name: weight} blend.

    None means the active blend. A blend of one adapter at weight 1.0 is that adapter itself; any other
    blend becomes its exact stacked-rank form under the name "blend" (see stack_blend).
    """
    if adapter is None:
        adapter = get_blend(model)
        if not adapter:
            raise ValueError("no adapter is active: pass adapter=NAME or adapter={name: weight, ...}")
    if isinstance(adapter, Mapping):
        bad = {n: w for n, w in adapter.items() if isinstance(w, Tensor)
               or not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w)}
        if bad:
            raise ValueError(f"blend weights must be finite floats to be saved as one adapter (a per-row tensor "
                             f"blend cannot be): {bad}")
        if len(adapter) == 1 and float(next(iter(adapter.values()))) == 1.0:
            adapter = next(iter(adapter))
    if isinstance(adapter, str):
        targets = adapter_targets(model, adapter)
        spec = adapter_specs(model).get(adapter) or _exact_spec(targets)
        return adapter, spec, targets, None
    parts = [(float(w), adapter_targets(model, n)) for n, w in adapter.items()]
    targets = stack_blend(parts)
    sources = [{"adapter": n, "weight": w, "tensors_sha256": _targets_sha256(t)} for (w, t), n in zip(parts, adapter)]
    return "blend", _exact_spec(targets), targets, {"blend": {"method": _BLEND_METHOD, "sources": sources}}


_BLEND_METHOD = "exact stacked rank: A = [A_1; ...; A_n], B = [w_1 s_1 B_1, ..., w_n s_n B_n], scale 1"


def _exact_spec(targets: Targets) -> LoRASpec:
    """A spec naming exactly these paths, with each one's rank and an alpha giving its scale (alpha / rank)."""
    ranks = {_glob_escape(p): A.shape[0] for p, (A, _, _) in targets.items()}
    alphas = {_glob_escape(p): s * A.shape[0] for p, (A, _, s) in targets.items()}
    top = max(ranks.values())
    return LoRASpec(list(ranks), rank=top, alpha=float(top),
                    rank_pattern={p: r for p, r in ranks.items() if r != top},
                    alpha_pattern={p: a for p, a in alphas.items() if a != top})


def alpha_for(spec: LoRASpec, path: str, rank: int, scale: float) -> float:
    """The alpha that gives `scale` at `rank`: the spec's own when it does, else derived from the scale."""
    if spec.rank_for(path) == rank and spec.scale_for(path) == scale:
        return spec.alpha_for(path)
    return scale * (math.sqrt(rank) if spec.use_rslora else rank)


# ---- saving --------------------------------------------------------------------------------------
def save_adapter(model: nn.Module, path: str | Path, adapter: str | Mapping[str, float] | None = "default",
                 training_summary: Mapping[str, Any] | None = None, extra_tensors: Mapping[str, Tensor] | None = None,
                 provenance: Mapping[str, Any] | None = None, fingerprint: Mapping[str, Any] | None = None
                 ) -> dict[str, Any]:
    """Write one adapter (or a {name: weight} blend, in exact stacked-rank form) to `path`, atomically.

    `extra_tensors` are stored as `extra.<name>`; None keeps the ones the adapter was loaded with.
    `fingerprint` is a precomputed base_fingerprint(model, paths) (it is computed when None).
    Works on a merged model (the base is fingerprinted from a restored copy). Returns the header document.
    """
    name, spec, targets, blend = resolve_adapter(model, adapter)
    if extra_tensors is None:
        extra_tensors = adapter_extras(model, name) if isinstance(adapter, str) else {}
    if fingerprint is None:
        fingerprint = base_fingerprint(model, list(targets))
    elif set(fingerprint.get("modules", {})) != set(targets):
        raise ValueError("the given fingerprint does not cover exactly the adapter's target modules; compute it "
                         "with base_fingerprint(model, paths) for the same adapter")
    entries = {}
    for p, (A, B, scale) in targets.items():
        module = model.get_submodule(p)
        entries[p] = target_entry(base_kind(module), list(module.weight.shape), _dtype_name(module.weight.dtype),
                                  A, B, scale, alpha_for(spec, p, A.shape[0], scale))
    provenance = {**(blend or {}), **dict(provenance or {})} or None
    return write_adapter_file(path, name, spec, targets, entries, fingerprint, training_summary, provenance,
                              extra_tensors)


def target_entry(kind: str, base_shape: list[int] | None, base_dtype: str | None, A: Tensor, B: Tensor,
                 scale: float, alpha: float) -> dict[str, Any]:
    """The header's description of one target module."""
    return {"base_kind": kind, "base_shape": base_shape, "base_dtype": base_dtype,
            "in_features": A.shape[1], "out_features": B.shape[0], "rank": A.shape[0],
            "alpha": _plain_number(alpha), "scale": float(scale)}


def write_adapter_file(path: str | Path, name: str, spec: LoRASpec, targets: Targets, entries: Mapping[str, dict],
                       fingerprint: Mapping[str, Any], training_summary: Mapping[str, Any] | None = None,
                       provenance: Mapping[str, Any] | None = None,
                       extra_tensors: Mapping[str, Tensor] | None = None) -> dict[str, Any]:
    """Assemble tensors and header and write them atomically; refuses NaN/inf before writing anything."""
    tensors = {}
    for p, (A, B, _) in targets.items():
        tensors[f"{p}.lora_A"], tensors[f"{p}.lora_B"] = A, B
    for n, t in (extra_tensors or {}).items():
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise ValueError(f"extra tensor {n!r} must be a floating-point tensor, got {type(t).__name__}")
        tensors[EXTRA_PREFIX + n] = t
    tensors = {k: t.detach().to("cpu", copy=True).contiguous() for k, t in tensors.items()}
    non_finite = [k for k, t in tensors.items() if not bool(torch.isfinite(t).all())]
    if non_finite:
        raise ValueError(f"refusing to save NaN/inf values in {_few(non_finite)}: the adapter diverged; "
                         "save an earlier state. Nothing was written.")
    doc = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "adapter": name,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "spec": spec.to_dict(), "targets": dict(entries), "base_fingerprint": dict(fingerprint),
        "tensors_sha256": tensors_sha256(tensors),
        "extra_tensors": {n: {"shape": list(t.shape), "dtype": _dtype_name(t.dtype)}
                          for n, t in (extra_tensors or {}).items()},
        "training_summary": training_summary, "provenance": provenance,
    }
    text = json.dumps(doc, indent=1, default=_jsonable)
    atomic_write_bytes(path, safetensors.torch.save(tensors, metadata={META_KEY: text}))
    return json.loads(text)


# ---- loading -------------------------------------------------------------------------------------
def load_adapter(model: nn.Module, path: str | Path, adapter: str | None = None, strict_base: bool = True) -> str:
    """Load an adapter file into the model (injecting where needed); returns the adapter's name.

    `adapter` renames it (default: the name in the file). Refuses a file whose base fingerprint differs
    from the model's base (strict_base=False applies it with a warning), and any damaged or inconsistent
    file, leaving the model unchanged. Works on a merged model: see install_adapter.
    """
    tensors, doc = read_adapter_file(path)
    name = adapter or doc["adapter"]
    check_new_name(model, name)
    entries = doc["targets"]
    check_targets(model, {p: ((e["base_kind"],), e["in_features"], e["out_features"]) for p, e in entries.items()},
                  source=str(path))
    check_base(model, doc["base_fingerprint"], strict=strict_base, source=str(path))
    targets = {p: (tensors[f"{p}.lora_A"], tensors[f"{p}.lora_B"], float(e["scale"])) for p, e in entries.items()}
    extras = {k[len(EXTRA_PREFIX):]: t for k, t in tensors.items() if k.startswith(EXTRA_PREFIX)}
    install_adapter(model, name, LoRASpec.from_dict(doc["spec"]), targets, extras, doc)
    return name


# ---- blending files ------------------------------------------------------------------------------
def blend_adapter_files(sources: Sequence[tuple[str | Path, float]], output: str | Path, name: str = "blend",
                        allow_different_base: bool = False) -> dict[str, Any]:
    """Combine adapter files with weights into one exact stacked-rank adapter file; returns its header.

    Applied alone, the result equals set_blend({source_i: w_i}) of the sources. Sources must share the
    base on every module they have in common (allow_different_base=True overrides). An extra tensor that
    every source has with the same shape is blended with the same weights; others are left out.
    """
    if not sources:
        raise ValueError("give at least one source adapter file")
    read = [(Path(p), float(w), *read_adapter_file(p)) for p, w in sources]
    entries: dict[str, dict] = {}
    modules: dict[str, dict] = {}
    for p, _, _, doc in read:
        for t, e in doc["targets"].items():
            first = entries.setdefault(t, e)
            if (first["base_kind"], first["in_features"], first["out_features"]) != (
                    e["base_kind"], e["in_features"], e["out_features"]):
                raise AdapterFileError(f"{p}: module {t} is a {e['base_kind']} with (in, out) = "
                                       f"{(e['in_features'], e['out_features'])} but an earlier source has "
                                       f"{(first['in_features'], first['out_features'])}: not the same base model")
            fp = doc["base_fingerprint"]["modules"][t]
            known = modules.setdefault(t, dict(fp))
            clash = [d for d in fp if d in known and known[d] != fp[d]]
            if clash and not allow_different_base:
                raise BaseMismatchError(f"{p}: module {t} has a different base fingerprint than an earlier source: "
                                        "the adapters were trained on different base models. Pass "
                                        "allow_different_base=True (--allow-different-base) to blend anyway.")
    parts = []
    for _, w, tensors, doc in read:
        parts.append((w, {t: (tensors[f"{t}.lora_A"], tensors[f"{t}.lora_B"], float(e["scale"]))
                          for t, e in doc["targets"].items()}))
    targets = stack_blend(parts)
    out_entries = {t: target_entry(entries[t]["base_kind"], entries[t].get("base_shape"), entries[t].get("base_dtype"),
                                   A, B, 1.0, A.shape[0]) for t, (A, B, _) in targets.items()}
    extras, dropped = _blend_extras(read)
    fingerprint = _fingerprint_doc({t: modules[t] for t in targets})
    provenance = {"blend": {"method": _BLEND_METHOD, "sources": [
        {"file": p.name, "file_sha256": _file_sha256(p), "adapter": doc["adapter"], "weight": w,
         "tensors_sha256": doc["tensors_sha256"], "base_fingerprint": doc["base_fingerprint"].get("sha256"),
         "provenance": doc.get("provenance")} for p, w, _, doc in read],
        "extra_tensors": "weighted sum with the same weights" if extras else None,
        "extra_tensors_left_out": dropped or None}}
    return write_adapter_file(output, name, _exact_spec(targets), targets, out_entries, fingerprint,
                              None, provenance, extras)


def _blend_extras(read) -> tuple[dict[str, Tensor], list[str]]:
    names = dict.fromkeys(k for _, _, tensors, _ in read for k in tensors if k.startswith(EXTRA_PREFIX))
    extras, dropped = {}, []
    for k in names:
        ts = [tensors.get(k) for _, _, tensors, _ in read]
        if any(t is None or t.shape != ts[0].shape for t in ts):
            dropped.append(k[len(EXTRA_PREFIX):])
            continue
        total = sum(t.double() * w for t, (_, w, _, _) in zip(ts, read))
        extras[k[len(EXTRA_PREFIX):]] = total.to(ts[0].dtype)
    if dropped:
        warnings.warn(f"extra tensors not in every source (or of different shapes) are left out of the blend: "
                      f"{dropped}", stacklevel=3)
    return extras, dropped


# ---- small helpers -------------------------------------------------------------------------------
def _targets_sha256(targets: Mapping[str, tuple[Tensor, Tensor, float]]) -> str:
    return tensors_sha256({f"{p}.lora_{ab}": t for p, (A, B, _) in targets.items() for ab, t in (("A", A), ("B", B))})


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _glob_escape(path: str) -> str:
    """A LoRASpec pattern matching exactly this path (fnmatch's special characters bracketed)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in path)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _is_dtype_name(name: Any) -> bool:
    return isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype)


def _is_pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _plain_number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def _few(items: Sequence[str], n: int = 8) -> str:
    items = list(items)
    return (str(items[:n])[:-1] + f", ... {len(items) - n} more]") if len(items) > n else str(items)


def _jsonable(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "item"):  # numpy scalars
        return x.item()
    return str(x)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m lora_engine.adapter_io FILE`: print the header document of an adapter file."""
    for p in (argv if argv is not None else sys.argv[1:]):
        print(json.dumps(read_adapter_file(p)[1], indent=2))


if __name__ == "__main__":
    main()
