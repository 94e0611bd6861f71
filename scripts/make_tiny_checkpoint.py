#!/usr/bin/env python3
"""Write a tiny, randomly initialised IndexTTS2 checkpoint directory (same layout as the real checkpoints/).

Runs in the upstream tier venv (scripts/setup_upstream_env.sh): every model is the real upstream/transformers
class at tiny size, and the hub models go under DIR/hf_cache/ in the Hugging Face cache layout, so that
data preparation, training and upstream's inference run from DIR with no download.
"""
from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True, help="directory to write (created; files are overwritten)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    args = parser.parse_args(argv)
    try:
        from indextts_integration.tiny_checkpoint import make_tiny_checkpoint
    except ImportError as exc:
        sys.exit(f"error: {exc}. Run this with the upstream tier's python "
                 "(bash scripts/setup_upstream_env.sh prints where it is).")
    start = time.perf_counter()
    out = make_tiny_checkpoint(args.output_dir, seed=args.seed)
    print(f"tiny IndexTTS2 checkpoint written to {out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
