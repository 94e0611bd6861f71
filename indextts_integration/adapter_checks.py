"""Checks an adapter file against a base model before it is used: format, checksum, finite tensors, targets,
ranks and the base fingerprint. A refused file becomes a result with its reason instead of an exception, so a
validation run reports it and goes on with the others."""
from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from lora_engine.adapter_io import AdapterFileError, check_base, check_targets, read_adapter_file

_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclasses.dataclass
class AdapterCheck:
    """What validation learned about one adapter file; `reason` says why it was refused (None = accepted)."""
    path: str
    label: str
    reason: str | None = None
    adapter: str | None = None
    ranks: list[int] = dataclasses.field(default_factory=list)
    alpha: float | None = None
    targets: int = 0
    lora_params: int = 0
    trained_steps: int | None = None
    extra_tensors: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.reason is None


def check_adapter_file(model: nn.Module, path: str | Path, label: str) -> AdapterCheck:
    """Read and fully check `path` against `model`'s base without changing the model."""
    result = AdapterCheck(path=str(path), label=label)
    try:
        tensors, doc = read_adapter_file(path)  # format, header, checksum, shapes vs ranks, NaN/inf
        entries = doc["targets"]
        check_targets(model, {p: ((e["base_kind"],), e["in_features"], e["out_features"]) for p, e in entries.items()},
                      source=str(path))
        check_base(model, doc["base_fingerprint"], strict=True, source=str(path))
    except AdapterFileError as e:
        result.reason = str(e)
        return result
    except OSError as e:
        result.reason = f"{path}: cannot read the file ({e}); check the path and permissions"
        return result
    spec = doc.get("spec", {})
    result.adapter = doc.get("adapter")
    result.ranks = sorted({int(e["rank"]) for e in entries.values()})
    result.alpha = spec.get("alpha")
    result.targets = len(entries)
    result.lora_params = sum(t.numel() for k, t in tensors.items() if k.endswith((".lora_A", ".lora_B")))
    result.trained_steps = (doc.get("training_summary") or {}).get("steps")
    result.extra_tensors = sorted(doc.get("extra_tensors") or {})
    return result


def collect_adapter_files(items: Sequence[str | Path]) -> list[tuple[Path, str]]:
    """(file, label) for each adapter argument: a file as is; a folder gives its *.safetensors and, for a
    training run folder, checkpoints/step-*/adapter.safetensors too. Byte-identical files are listed once
    (adapter_best.safetensors is a copy of a checkpoint's adapter)."""
    found: list[tuple[Path, str]] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            files = sorted(p.glob("*.safetensors"))
            files += sorted((p / "checkpoints").glob("step-*/adapter.safetensors"), key=_step_of)
            if not files:
                raise FileNotFoundError(f"--adapters {p}: the folder holds no *.safetensors and no "
                                        "checkpoints/step-*/adapter.safetensors; give adapter files or a run folder")
            found += [(f, _label(f, p.name)) for f in files]
        elif p.exists():
            found.append((p, _label(p, None)))
        else:
            raise FileNotFoundError(f"--adapters {p}: no such file or folder")
    return _unique(found)


def _step_of(path: Path) -> int:
    m = _STEP_DIR.match(path.parent.name)
    return int(m.group(1)) if m else -1


def _label(path: Path, folder: str | None) -> str:
    step = _step_of(path)
    if step >= 0:
        return f"{path.parents[2].name}@step{step}"
    return f"{folder}/{path.stem}" if folder else path.stem


def _unique(found: list[tuple[Path, str]]) -> list[tuple[Path, str]]:
    seen_bytes: set[str] = set()
    labels: set[str] = set()
    out = []
    for path, label in found:
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else str(path)
        if digest in seen_bytes:
            continue
        seen_bytes.add(digest)
        name, k = label, 2
        while name in labels:
            name, k = f"{label}_{k}", k + 1
        labels.add(name)
        out.append((path, name))
    return out


def training_info(adapter_path: str | Path) -> dict[str, Any]:
    """Where the adapter's training run logged (metrics.jsonl), found beside it or, for a checkpoint's adapter,
    in the run folder two levels up; plus the checkpoint step when it is one."""
    path = Path(adapter_path)
    step = _step_of(path)
    run = path.parents[2] if step >= 0 and len(path.parents) > 2 else path.parent
    metrics = run / "metrics.jsonl"
    return {"run_dir": str(run), "metrics": str(metrics) if metrics.is_file() else None,
            "step": step if step >= 0 else None}
