#!/usr/bin/env python
"""Blend several voice adapters into one adapter file, exactly.

The result is the adapter sum_i w_i * (scale_i * B_i A_i) in stacked-rank form: A = [A_1; ...; A_n],
B = [w_1 s_1 B_1, ..., w_n s_n B_n], scale 1. Nothing is truncated (no SVD), so loading the blended file
alone gives the same outputs as the runtime blend set_blend({a1: w1, a2: w2, ...}) of its sources; its
rank is the sum of theirs. The header records the provenance: each source's file name, sha256, adapter
name, tensor checksum, base fingerprint and weight. All sources must be made for the same base model.
An extra tensor (e.g. a speaker latent) that every source carries with the same shape is blended with
the same weights; others are left out (with a warning).

Examples:
  python scripts/blend.py --adapter alice.safetensors:0.7 --adapter bob.safetensors:0.3 --output mix.safetensors
  python scripts/blend.py --adapter alice.safetensors --adapter bob.safetensors:-0.5 --output less_bob.safetensors

A weight defaults to 1.0; weights need not sum to 1 and may be negative. Load the result with
lora_engine.load_adapter(model, "mix.safetensors"), or print its header with
python -m lora_engine.adapter_io mix.safetensors.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lora_engine.adapter_io import AdapterFileError, blend_adapter_files  # noqa: E402


def parse_source(text: str) -> tuple[str, float]:
    """'PATH[:WEIGHT]' -> (path, weight); a ':' followed by something that is not a number stays in the path."""
    path, sep, weight = text.rpartition(":")
    if sep and path:
        try:
            return path, float(weight)
        except ValueError:
            pass
    return text, 1.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", dest="sources", action="append", required=True, metavar="PATH[:WEIGHT]",
                   type=parse_source, help="an adapter .safetensors file and its blend weight (default 1.0); "
                                           "repeat for each source")
    p.add_argument("--output", required=True, help="the blended adapter file to write (written atomically)")
    p.add_argument("--name", default="blend", help="adapter name stored in the file (default: blend)")
    p.add_argument("--allow-different-base", action="store_true",
                   help="blend even if the sources' base fingerprints differ (they were trained on different "
                        "base models; the result is then meaningful for neither)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        doc = blend_adapter_files(args.sources, args.output, name=args.name,
                                  allow_different_base=args.allow_different_base)
    except (AdapterFileError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ranks = sorted({t["rank"] for t in doc["targets"].values()})
    print(f"wrote {args.output}: {len(doc['targets'])} modules, rank {'/'.join(map(str, ranks))}, from "
          + ", ".join(f"{s['file']} x {s['weight']:g}" for s in doc["provenance"]["blend"]["sources"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
