"""scripts/validate.py on the embedded tiny default: a real training run (two checkpoints), a corrupt file and a
wrong-base adapter; the report shows every section for the base and both checkpoints, the bad files as refused
with their reasons, and the run finishes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
import torch

from indextts_integration import model_dir as md
from indextts_integration.demo_sentences import DEMO_SENTENCES
from indextts_integration.report import BEST, SECTIONS
from lora_engine import LoRASpec, inject_lora, lora_layers, save_adapter
from tests.script_loader import load_script

pytestmark = pytest.mark.upstream
REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "validate.py"
validate_script = load_script("validate")
TEXTS = ["Hello there, this is a test.", "She sells sea shells by the sea shore."]


@pytest.fixture(scope="module")
def prepared(tiny_ckpt, demo_dir, tmp_path_factory) -> Path:
    from indextts_integration.prepare import PrepareOptions, prepare_dataset

    out = tmp_path_factory.mktemp("prepared")
    prepare_dataset(PrepareOptions(model_dir=tiny_ckpt, audio_dir=demo_dir, transcripts=demo_dir / "transcripts.csv",
                                   output_dir=out, val_ratio=0.34, progress=False))
    return out


@pytest.fixture(scope="module")
def report(tiny_ckpt, demo_dir, prepared, tmp_path_factory) -> Path:
    """Train 4 steps (checkpoints at 2 and 4), add two bad files, run validate.py's main()."""
    from indextts_integration.training import make_task
    from lora_engine.training import TrainConfig, train

    root = tmp_path_factory.mktemp("validate")
    cfg = TrainConfig(model_dir=str(tiny_ckpt), train_manifests=[str(prepared / "train_manifest.jsonl")],
                      val_manifests=[str(prepared / "val_manifest.jsonl")], output_dir=str(root / "alice"),
                      adapter_name="alice", max_steps=4, batch_size=2, learning_rate=3e-2, eval_every=2,
                      save_every=2, progress=False, tensorboard=False)
    train(cfg, make_task(cfg))
    bad = root / "bad"
    bad.mkdir()
    good = (root / "alice" / "adapter.safetensors").read_bytes()
    (bad / "corrupt.safetensors").write_bytes(good[: len(good) // 2])
    other = md.load_unified_voice(tiny_ckpt)
    with torch.no_grad():
        other.gpt.h[0].mlp.c_fc.weight.mul_(1.01)  # another base model
    inject_lora(other, LoRASpec(["gpt.h.*.mlp.c_fc"], rank=2, alpha=4), adapter="other")
    for layer in lora_layers(other).values():
        torch.nn.init.normal_(layer.lora_B["other"], std=0.05)
    save_adapter(other, bad / "wrong_base.safetensors", adapter="other")
    texts = root / "texts.txt"
    heldout = demo_dir / "demo_005.wav"
    texts.write_text(f"# a comment\n{TEXTS[0]}\n\n{heldout}|{TEXTS[1]}\n")
    out = root / "report"
    rc = validate_script.main(["--model-dir", str(tiny_ckpt), "--adapters", str(root / "alice"), str(bad),
                               "--reference-audio", str(demo_dir / "demo_000.wav"),
                               "--reference-text", DEMO_SENTENCES[0],
                               "--prompt-audio", str(demo_dir / "demo_001.wav"), "--texts", str(texts),
                               "--val-manifest", str(prepared / "val_manifest.jsonl"), "--output-dir", str(out),
                               "--max-mel-tokens", "30", "--num-beams", "1", "--seed", "7"])
    assert rc == 0
    return out


def test_every_section_for_base_and_two_checkpoints(report):
    md_text, page = (report / "report.md").read_text(), (report / "report.html").read_text()
    for section in SECTIONS:
        assert f"## {section}" in md_text and f"<h2>{section}</h2>" in page
    results = json.loads((report / "results.json").read_text())
    labels = [c["label"] for c in results["checkpoints"]]
    # adapter.safetensors == the step-4 checkpoint (and adapter_best is a copy of one): listed once each
    assert labels[0] == "base" and labels[1] == "alice/adapter" and len(labels) == 3, labels
    assert labels[2] in ("alice@step2", "alice/adapter_best")
    metrics_table = md_text.split("## Metrics")[1].split("## Training curves")[0]
    for label in labels:
        assert f"| {label} |" in metrics_table
    for col in ("speaker similarity", "duration ratio", "val loss", "mel accuracy", "mel perplexity"):
        assert col in metrics_table
    assert BEST in metrics_table
    for c in results["checkpoints"]:
        m = c["metrics"]
        assert -1.0 <= m["speaker_similarity"] <= 1.0 + 1e-9 and m["speaker_similarity"] != 0
        assert m["val_loss"] > 0 and 0 <= m["mel_accuracy"] <= 1 and m["mel_perplexity"] > 1
        assert len(c["samples"]) == 2 and all(s["duration_ratio"] > 0 for s in c["samples"])
        for s in c["samples"]:
            audio, sr = sf.read(report / s["path"])
            assert sr == 22050 and audio.size > 0 and abs(audio).max() > 0
            assert f"src='{s['path']}'" in page
    # the held-out recording's length is the expected duration of text 2
    s = results["checkpoints"][0]["samples"][1]
    assert s["duration_ratio"] == pytest.approx(s["seconds"] / sf.info(results["texts"][1]["audio"]).duration)
    assert "![training curves](figures/training_curves.png)" in md_text
    figs = {p.name for p in (report / "figures").glob("*.png")}
    assert figs == {"mels_00.png", "mels_01.png", "training_curves.png"}


def test_adapters_change_the_samples_and_the_loss(report):
    results = json.loads((report / "results.json").read_text())
    base, adapted = results["checkpoints"][0], results["checkpoints"][1]
    assert base["metrics"]["val_loss"] != adapted["metrics"]["val_loss"]
    assert any(sf.read(report / a["path"])[0].tobytes() != sf.read(report / b["path"])[0].tobytes()
               for a, b in zip(base["samples"], adapted["samples"]))


def test_bad_files_are_refused_with_reasons_and_the_run_finishes(report):
    results = json.loads((report / "results.json").read_text())
    refused = {c["label"]: c["reason"] for c in results["checks"] if not c["ok"]}
    assert set(refused) == {"bad/corrupt", "bad/wrong_base"}
    assert "truncated or corrupt" in refused["bad/corrupt"]
    assert "base fingerprint mismatch" in refused["bad/wrong_base"] and "gpt.h.0.mlp.c_fc" in refused["bad/wrong_base"]
    accepted = [c for c in results["checks"] if c["ok"]]
    assert all(c["adapter"] == "alice" and c["ranks"] == [8] and c["targets"] > 0 for c in accepted)
    md_text = (report / "report.md").read_text()
    assert "| bad/corrupt | REFUSED |" in md_text and "| bad/wrong_base | REFUSED |" in md_text
    assert not (report / "samples" / "bad_corrupt").exists()


def test_same_seed_same_audio_other_seed_other_audio(tiny_ckpt, demo_dir, tmp_path):
    from indextts_integration.synthesis import synthesize
    from indextts_integration.upstream_tts import build_indextts2

    tts = build_indextts2(tiny_ckpt)
    prompt = demo_dir / "demo_001.wav"
    wavs = [synthesize(tts, TEXTS[0], prompt, tmp_path / f"{i}.wav", seed=s, max_mel_tokens=20, num_beams=1)
            for i, s in enumerate([3, 3, 4])]
    a, b, c = (sf.read(w)[0] for w in wavs)
    assert a.tobytes() == b.tobytes() and a.tobytes() != c.tobytes()  # the first call encodes the prompt too


def test_help_lists_every_option():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, check=True).stdout
    for flag in ("--model-dir", "--adapters", "--reference-audio", "--prompt-audio", "--reference-text", "--texts",
                 "--output-dir", "--val-manifest", "--asr-model", "--device", "--seed", "--max-mel-tokens",
                 "--num-beams", "--do-sample", "--base", "Example:"):
        assert flag in out, flag


def test_missing_inputs_fail_with_advice(tiny_ckpt, tmp_path, capsys):
    rc = validate_script.main(["--model-dir", str(tiny_ckpt), "--adapters", str(tmp_path / "nope"),
                               "--reference-audio", str(tmp_path / "r.wav"), "--texts", str(tmp_path / "t.txt"),
                               "--output-dir", str(tmp_path / "o")])
    assert rc == 2 and "one sentence a line" in capsys.readouterr().err
