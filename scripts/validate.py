#!/usr/bin/env python
"""Validate IndexTTS2 voice adapters: check each file, synthesize the same texts with the same seeds for the base
model and every adapter through upstream IndexTTS2.infer, score the samples, and write a report.

Per checkpoint (the base model, then each accepted adapter):
  speaker similarity   cosine of CAMPPlus embeddings (IndexTTS2's speaker encoder) vs --reference-audio
  duration ratio       sample length / expected length (from 'recording.wav|text' lines or --reference-text)
  WER                  only with --asr-model, a local ASR model folder (nothing is downloaded)
  val loss, mel accuracy, mel perplexity   with --val-manifest (teacher-forced GPT scores)
A corrupt, damaged or wrong-base adapter file is listed as REFUSED with the reason; the run goes on.

Output (--output-dir): report.html (tables, spectrograms, audio players), report.md, results.json,
samples/<checkpoint>/NN.wav and figures/*.png.

Example:
  python scripts/validate.py --model-dir checkpoints/ --adapters runs/alice runs/bob/adapter.safetensors \\
      --reference-audio data/alice_heldout.wav --texts texts.txt --val-manifest prepared/val_manifest.jsonl \\
      --output-dir reports/alice
--texts holds one sentence a line, or 'recording.wav|sentence' to use that recording's length as the
expected duration. Run it with the python where upstream IndexTTS2 (indextts2-cli) is installed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    B = argparse.BooleanOptionalAction
    p.add_argument("--model-dir", required=True, help="IndexTTS2 checkpoints/ folder (config.yaml, gpt.pth, ...)")
    p.add_argument("--adapters", nargs="*", default=[], metavar="DIR_OR_FILE",
                   help="adapter .safetensors files, folders of them, or training run folders (their "
                        "adapter*.safetensors and checkpoints/step-*/adapter.safetensors); none = base only")
    p.add_argument("--reference-audio", required=True, metavar="WAV",
                   help="the target speaker's audio that samples are compared with (held-out, ideally)")
    p.add_argument("--prompt-audio", metavar="WAV",
                   help="speaker prompt given to IndexTTS2.infer (default: --reference-audio; a different "
                        "recording of the speaker keeps similarity from just measuring prompt copying)")
    p.add_argument("--reference-text", help="transcript of --reference-audio: its speaking rate gives the "
                                            "expected duration of texts without their own recording")
    p.add_argument("--texts", required=True, metavar="FILE",
                   help="one sentence a line, or 'recording.wav|sentence' (blank lines and # comments skipped)")
    p.add_argument("--output-dir", required=True, metavar="OUT", help="where the report and samples go")
    p.add_argument("--val-manifest", metavar="JSONL", help="val_manifest.jsonl from scripts/prepare_dataset.py")
    p.add_argument("--asr-model", metavar="DIR", help="local speech-recognition model folder for WER")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--seed", type=int, default=1234, help="seed of text i is seed + i, the same for every "
                                                          "checkpoint (default 1234)")
    p.add_argument("--max-mel-tokens", type=int, default=1500,
                   help="longest generation in mel codes (~50 per second; upstream default 1500)")
    p.add_argument("--num-beams", type=int, default=3, help="beam count of GPT generation (upstream default 3)")
    p.add_argument("--do-sample", action=B, default=True, help="sample (upstream default) or decode greedily")
    p.add_argument("--base", action=B, default=True, help="also evaluate the base model without adapters")
    p.add_argument("--verbose", action="store_true", help="show upstream's inference prints")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from indextts_integration.validation import ValidationOptions, run_validation

    opts = ValidationOptions(model_dir=args.model_dir, adapters=args.adapters, reference_audio=args.reference_audio,
                             texts=args.texts, output_dir=args.output_dir, prompt_audio=args.prompt_audio,
                             reference_text=args.reference_text, val_manifest=args.val_manifest,
                             asr_model=args.asr_model, device=args.device, seed=args.seed,
                             max_mel_tokens=args.max_mel_tokens, num_beams=args.num_beams,
                             do_sample=args.do_sample, include_base=args.base, verbose=args.verbose)
    try:
        results = run_validation(opts)
    except (FileNotFoundError, ValueError) as e:
        print(f"[validate] error: {e}", file=sys.stderr)
        return 2
    refused = [c for c in results["checks"] if not c["ok"]]
    out = Path(args.output_dir)
    print(f"[validate] {len(results['checkpoints'])} checkpoint(s) evaluated, {len(refused)} adapter file(s) "
          f"refused; report: {out / 'report.html'} and {out / 'report.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
