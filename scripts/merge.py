#!/usr/bin/env python3
"""Merge voice adapters into IndexTTS2's GPT and write a gpt.pth that stock IndexTTS2 loads.

  python scripts/merge.py --model-dir checkpoints --adapter alice.safetensors --output checkpoints/gpt_alice.pth
  python scripts/merge.py --model-dir checkpoints --adapter alice.safetensors:0.7 --adapter bob.safetensors:0.3 \\
      --output voices/gpt_blend.pth --write-config

Each --adapter is PATH[:WEIGHT] (weight 1.0 if omitted); several are merged as their exact weighted sum.
The output has exactly the keys, shapes and dtypes of the model dir's gpt.pth (only targeted tensors change),
so IndexTTS2 loads it with load_state_dict(strict=True). With --write-config a config.yaml pointing at it is
written next to it (config_<name>.yaml inside the model dir): use IndexTTS2(cfg_path=that, model_dir=<model dir>).

License: the merged checkpoint contains IndexTTS2 weights modified by your adapters. It is a Derivative Work
of IndexTTS2 under the bilibili Model Use License; a notice is written beside it (<output>.LICENSE.txt).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True, type=Path, help="IndexTTS2 checkpoints/ dir holding config.yaml + gpt.pth")
    p.add_argument("--adapter", required=True, action="append", metavar="PATH[:WEIGHT]",
                   help="adapter .safetensors, optionally with a blend weight; repeat to merge several")
    p.add_argument("--output", required=True, type=Path, help="where to write the merged gpt .pth")
    p.add_argument("--write-config", action="store_true", help="also write a config.yaml that points at the output")
    p.add_argument("--force-base", action="store_true",
                   help="merge even if an adapter's base fingerprint differs from this gpt.pth (not recommended)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from indextts_integration.deploy import LICENSE_NOTICE, parse_adapter_args, write_merged_gpt
    except ImportError as exc:
        sys.exit(f"error: {exc}. Run this in the environment where IndexTTS2 is installed "
                 "(here: bash scripts/setup_upstream_env.sh).")
    adapters = parse_adapter_args(args.adapter)
    for path, _ in adapters:
        if not Path(path).is_file():
            sys.exit(f"error: adapter file {path} does not exist")
    from indextts_integration.model_dir import ModelDirError
    from lora_engine.adapter_io import AdapterFileError, BaseMismatchError

    start = time.perf_counter()
    try:
        out = write_merged_gpt(args.model_dir, adapters, args.output, write_config=args.write_config,
                               strict_base=not args.force_base)
    except BaseMismatchError as exc:
        sys.exit(f"error: {exc}\nNothing was written. Merge it into the gpt.pth it was trained on, or pass "
                 "--force-base to merge anyway.")
    except (AdapterFileError, ModelDirError) as exc:
        sys.exit(f"error: {exc}\nNothing was written.")
    mix = ", ".join(f"{Path(p).name} x {w:g}" for p, w in adapters)
    print(f"merged {mix} into {out} in {time.perf_counter() - start:.1f} s")
    print(LICENSE_NOTICE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
