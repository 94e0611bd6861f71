"""LoRASpec: which modules get an adapter, and with what rank, alpha, dropout and init."""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import math
from pathlib import Path
from typing import Any, Iterable

INITS = ("kaiming", "gaussian")


def path_matches(pattern: str, path: str) -> bool:
    """Glob over dotted module paths: `*` (or any fnmatch glob) matches one path component, `**` any number."""
    return _match(pattern.split("."), path.split("."))


def _match(pat: list[str], parts: list[str]) -> bool:
    if not pat:
        return not parts
    if pat[0] == "**":
        return any(_match(pat[1:], parts[i:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pat[0]) and _match(pat[1:], parts[1:])


def closest_names(pattern: str, names: Iterable[str], n: int = 5) -> list[str]:
    """Module names that look most like a pattern that matched nothing (for the error message)."""
    names = list(names)
    probe = pattern.replace("**", "0").replace("*", "0")
    return difflib.get_close_matches(probe, names, n=n, cutoff=0.3)


@dataclasses.dataclass
class LoRASpec:
    """What to adapt and how. `target_modules` are glob patterns over `named_modules()` paths.

    `rank_pattern` / `alpha_pattern` map a pattern to an override; the first matching key wins.
    Scale is alpha / rank, or alpha / sqrt(rank) with `use_rslora`.
    """

    target_modules: list[str]
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    use_rslora: bool = False
    init: str = "kaiming"

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        self.target_modules = list(self.target_modules)
        if not self.target_modules:
            raise ValueError("LoRASpec.target_modules is empty: give at least one module path pattern, "
                             "e.g. ['gpt.h.*.attn.c_attn']")
        for name, r in [("rank", self.rank), *((f"rank_pattern[{k!r}]", v) for k, v in self.rank_pattern.items())]:
            if not isinstance(r, int) or isinstance(r, bool) or r < 1:
                raise ValueError(f"LoRASpec.{name} must be a positive integer, got {r!r}")
        for name, a in [("alpha", self.alpha), *((f"alpha_pattern[{k!r}]", v) for k, v in self.alpha_pattern.items())]:
            if not isinstance(a, (int, float)) or not math.isfinite(a):
                raise ValueError(f"LoRASpec.{name} must be a finite number, got {a!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRASpec.dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in INITS:
            raise ValueError(f"LoRASpec.init must be one of {INITS}, got {self.init!r}")

    def matches(self, path: str) -> bool:
        return any(path_matches(p, path) for p in self.target_modules)

    def rank_for(self, path: str) -> int:
        return next((r for p, r in self.rank_pattern.items() if path_matches(p, path)), self.rank)

    def alpha_for(self, path: str) -> float:
        return next((float(a) for p, a in self.alpha_pattern.items() if path_matches(p, path)), float(self.alpha))

    def scale_for(self, path: str) -> float:
        rank, alpha = self.rank_for(path), self.alpha_for(path)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LoRASpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown LoRASpec keys {unknown}; expected some of {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | Path, key: str | None = None) -> "LoRASpec":
        """Read a spec from a YAML file; `key` picks a section (e.g. "lora") of a larger config."""
        import yaml

        data = yaml.safe_load(Path(path).read_text())
        if key is not None:
            if not isinstance(data, dict) or key not in data:
                raise ValueError(f"{path}: no {key!r} section")
            data = data[key]
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of LoRASpec fields, got {type(data).__name__}")
        return cls.from_dict(data)
