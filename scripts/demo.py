#!/usr/bin/env python3
"""The whole voice pipeline on the embedded default, end to end, with no download.

  tiny IndexTTS2 checkpoint -> two demo voices (espeak-ng speech) -> prepare -> train one LoRA per voice
  -> validate (loss / mel accuracy / perplexity, base vs adapters) -> merge into a gpt.pth (strict-loadable)
  -> synthesize through upstream IndexTTS2.infer with one adapter, then with a live 50/50 blend of both

The tiny checkpoint has random weights, so the audio is noise-like and the numbers only show that every
stage runs; pointed at real checkpoints the same stages are what scripts/prepare_dataset.py, train.py,
merge.py do. Run it with the upstream tier's python: `bash scripts/run_demo.sh [flags below]` sets that up
(cached) and runs this script. On a 2-core CPU the defaults take about a minute after the set-up.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

VOICES = {"alice": "en-us", "bob": "en-gb-scotland"}
SAMPLE_TEXT = "Hello! This voice was fine-tuned with a LoRA adapter."


def stage(title: str) -> float:
    print(f"\n=== {title} ===", flush=True)
    return time.perf_counter()


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", type=Path, default=Path("runs/demo"), help="where everything goes (default runs/demo)")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per voice (default 40)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--skip-audio", action="store_true", help="stop after merging (no IndexTTS2.infer)")
    args = p.parse_args(argv)

    import torch

    from indextts_integration.demo_data import make_demo_dataset
    from indextts_integration.deploy import load_indextts2, set_voice_blend, write_merged_gpt
    from indextts_integration.evaluate import manifest_metrics
    from indextts_integration.model_dir import build_unified_voice, load_config, load_unified_voice
    from indextts_integration.prepare import PrepareOptions, prepare_dataset
    from indextts_integration.tiny_checkpoint import make_tiny_checkpoint
    from indextts_integration.training import make_task
    from lora_engine import load_adapter, set_blend
    from lora_engine.atomic import atomic_write_bytes
    from lora_engine.training import TrainConfig, train

    out = args.output_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"stages_s": {}}

    t = stage("1. tiny IndexTTS2 checkpoint (real upstream classes, random weights)")
    ckpt = out / "checkpoints"
    if not ckpt.is_dir():  # made aside and renamed: an interrupted run never leaves half a checkpoint
        partial = out / "checkpoints.partial"
        shutil.rmtree(partial, ignore_errors=True)
        os.replace(make_tiny_checkpoint(partial, seed=0), ckpt)
    print(f"model dir: {ckpt}")
    summary["stages_s"]["checkpoint"] = time.perf_counter() - t

    t = stage("2. demo voices (espeak-ng) and 3. prepare_dataset")
    prepared = {}
    for name, voice in VOICES.items():
        data = make_demo_dataset(out / "data" / name, n_utterances=12, voice=voice)
        prep = out / "prepared" / name
        s = prepare_dataset(PrepareOptions(model_dir=ckpt, audio_dir=data.parent, transcripts=data, output_dir=prep,
                                           val_ratio=0.2, device=args.device, progress=False))
        print(f"{name} ({voice}): train {s.train}, val {s.val}, rejected {s.rejected}")
        prepared[name] = prep
    summary["stages_s"]["data+prepare"] = time.perf_counter() - t

    t = stage("4. train one LoRA adapter per voice")
    adapters = {}
    for name, prep in prepared.items():
        run = out / "runs" / name
        cfg = TrainConfig(model_dir=str(ckpt), train_manifests=[str(prep / "train_manifest.jsonl")],
                          val_manifests=[str(prep / "val_manifest.jsonl")], output_dir=str(run), adapter_name=name,
                          max_steps=args.steps, batch_size=4, learning_rate=3e-3, warmup_steps=5,
                          eval_every=max(1, args.steps // 2), save_every=args.steps, device=args.device,
                          resume=(run / "checkpoints").is_dir(), progress=False, tensorboard=False)
        result = train(cfg, make_task(cfg))
        adapters[name] = Path(cfg.output_dir) / "adapter.safetensors"
        print(f"{name}: step {result.step}, train loss {_fmt(result.loss)}, val loss {_fmt(result.val_loss)} "
              f"-> {adapters[name]}")
    summary["stages_s"]["train"] = time.perf_counter() - t

    t = stage("5. validate: base vs each adapter on each voice's held-out utterances")
    gpt = load_unified_voice(ckpt)
    for name, path in adapters.items():
        load_adapter(gpt, path, adapter=name)
    table = {}
    for voice_on in ["base", *adapters]:
        set_blend(gpt, {} if voice_on == "base" else {voice_on: 1.0})
        table[voice_on] = {f"val_{v}": manifest_metrics(gpt, prepared[v] / "val_manifest.jsonl") for v in prepared}
        row = "  ".join(f"{k}: loss {m['val_loss']:.3f} acc {m['mel_accuracy']:.3f}" for k, m in table[voice_on].items())
        print(f"{voice_on:>6}  {row}")
    summary["validation"] = table
    summary["stages_s"]["validate"] = time.perf_counter() - t

    t = stage("6. merge alice into a gpt.pth that stock IndexTTS2 loads strictly")
    merged = write_merged_gpt(ckpt, [(adapters["alice"], 1.0)], out / "deploy" / "gpt_alice.pth", write_config=True)
    fresh = build_unified_voice(load_config(ckpt))
    fresh.load_state_dict(torch.load(merged, weights_only=True), strict=True)
    fresh_metrics = manifest_metrics(fresh, prepared["alice"] / "val_manifest.jsonl")
    drift = abs(fresh_metrics["val_loss"] - table["alice"]["val_alice"]["val_loss"])
    print(f"{merged}: strict load OK; val loss {fresh_metrics['val_loss']:.5f} (unmerged adapter: "
          f"{table['alice']['val_alice']['val_loss']:.5f}, |diff| {drift:.2e})")
    summary["merge"] = {"path": str(merged), "val_loss_merged_file": fresh_metrics["val_loss"], "abs_diff": drift}
    summary["stages_s"]["merge"] = time.perf_counter() - t

    if not args.skip_audio:
        t = stage("7. synthesize through upstream IndexTTS2.infer: adapter, then a live blend")
        tts = load_indextts2(ckpt, lora_path=[(str(adapters["alice"]), 1.0), (str(adapters["bob"]), 0.0)],
                             device=args.device)
        prompt = sorted((out / "data" / "alice").glob("*.wav"))[0]
        samples = out / "samples"
        samples.mkdir(exist_ok=True)
        for label, mix in (("alice", {"alice": 1.0, "bob": 0.0}), ("blend_alice50_bob50", {"alice": 0.5, "bob": 0.5})):
            set_voice_blend(tts, mix)
            torch.manual_seed(0)
            wav = tts.infer(spk_audio_prompt=str(prompt), text=SAMPLE_TEXT, output_path=str(samples / f"{label}.wav"),
                            max_mel_tokens=120, verbose=False)
            print(f"{label}: {wav}")
        summary["samples"] = {label: str(samples / f"{label}.wav") for label in ("alice", "blend_alice50_bob50")}
        summary["stages_s"]["synthesize"] = time.perf_counter() - t

    summary["adapters"] = {name: str(path) for name, path in adapters.items()}
    atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=2).encode())
    print(f"\nDone. Summary: {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
