#!/usr/bin/env python3
"""Prepare a voice dataset for LoRA training of IndexTTS2's GPT (UnifiedVoice).

Reads a folder of audio (wav/flac/mp3/ogg, any rate and channel count) and a transcript file in one of three
forms, detected automatically:
  CSV with a header      filename,text
  LJSpeech metadata      id|text[|normalized]
  JSONL                  {"audio": "a.wav", "text": "...", "speaker": "optional"}
and writes OUTPUT_DIR/train_manifest.jsonl, val_manifest.jsonl, features/<id>.pt (semantic codes, w2v-bert
conditioning features and latents, text ids), rejects.jsonl (every skipped file with its reason) and
prepare_summary.json. Re-running skips utterances whose features are already there.

Run it with the upstream tier's python (bash scripts/setup_upstream_env.sh prints where it is).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    """The CLI's flags (all map onto indextts_integration.prepare.PrepareOptions)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True, type=Path,
                   help="IndexTTS2 checkpoints/ dir (or one from scripts/make_tiny_checkpoint.py)")
    p.add_argument("--audio-dir", required=True, type=Path, help="folder the transcript's file names are relative to")
    p.add_argument("--transcripts", required=True, type=Path, help="CSV, LJSpeech metadata or JSONL file")
    p.add_argument("--output-dir", required=True, type=Path, help="where manifests and features go")
    p.add_argument("--val-ratio", type=float, default=0.1, help="share of utterances for validation (default 0.1)")
    p.add_argument("--prompt-mode", choices=("paired", "self"), default="paired",
                   help="paired (default): condition each utterance on another one of the same speaker, "
                        "to avoid prompt bleed; self: on itself")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt pairing (default 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--min-seconds", type=float, default=0.5, help="reject shorter files (default 0.5)")
    p.add_argument("--silence-dbfs", type=float, default=-60.0,
                   help="reject files whose RMS level is below this (default -60 dBFS)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import torch

        from indextts_integration.prepare import PrepareOptions, prepare_dataset
    except ImportError as exc:
        sys.exit(f"error: {exc}. Run this with the upstream tier's python (bash scripts/setup_upstream_env.sh).")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    for flag, path in (("--model-dir", args.model_dir), ("--audio-dir", args.audio_dir),
                       ("--transcripts", args.transcripts)):
        if not path.exists():
            sys.exit(f"error: {flag} {path} does not exist")
    summary = prepare_dataset(PrepareOptions(
        model_dir=args.model_dir, audio_dir=args.audio_dir, transcripts=args.transcripts,
        output_dir=args.output_dir, val_ratio=args.val_ratio, prompt_mode=args.prompt_mode, seed=args.seed,
        device=device, min_seconds=args.min_seconds, silence_dbfs=args.silence_dbfs,
        progress=not args.no_progress))
    print(f"train {summary.train}, val {summary.val}, rejected {summary.rejected} {summary.reasons}, "
          f"reused {summary.reused} cached, {summary.seconds:.1f} s -> {args.output_dir}")
    if summary.train == 0:
        print("error: no usable utterance; see rejects.jsonl for why", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
