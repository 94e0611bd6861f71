"""manifest_metrics (indextts_integration/evaluate.py): loss, mel accuracy and perplexity of the model's current
voice over a prepared manifest, independent of the batch size, and the model's train/eval mode left as found."""
from __future__ import annotations

import math

import pytest
import torch

from indextts_integration import model_dir as md
from indextts_integration.evaluate import manifest_metrics
from indextts_integration.gpt_loss import GPTBatch, gpt_forward
from indextts_integration.prepare import PrepareOptions, prepare_dataset
from indextts_integration.training import collate, manifest_examples

pytestmark = pytest.mark.upstream


@pytest.fixture(scope="module")
def manifest(tiny_ckpt, demo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    prepare_dataset(PrepareOptions(model_dir=tiny_ckpt, audio_dir=demo_dir, transcripts=demo_dir / "transcripts.csv",
                                   output_dir=out, val_ratio=0.0, progress=False))
    return out / "train_manifest.jsonl"


def test_metrics_match_per_utterance_forwards_and_ignore_batch_size(tiny_ckpt, manifest):
    gpt = md.load_unified_voice(tiny_ckpt).train()
    rows = manifest_examples(manifest, 0)
    singles = []
    with torch.no_grad():
        gpt.eval()
        for row in rows:
            singles.append(gpt_forward(gpt, GPTBatch(**collate([row]))))
        gpt.train()
    one, four = manifest_metrics(gpt, manifest, batch_size=1), manifest_metrics(gpt, manifest, batch_size=4)
    assert gpt.training  # mode restored
    assert one["utterances"] == four["utterances"] == len(rows) == 6
    assert one["val_loss"] == pytest.approx(sum(s.loss.item() for s in singles) / len(rows), rel=1e-5)
    count = sum(int(s.mel_count) for s in singles)
    mel_ce = sum(s.mel_loss.item() * int(s.mel_count) for s in singles) / count
    for m in (one, four):
        assert m["mel_accuracy"] == pytest.approx(sum(int(s.mel_correct) for s in singles) / count)
        assert m["mel_perplexity"] == pytest.approx(math.exp(mel_ce), rel=1e-4)
    assert 1 < one["mel_perplexity"] < 8194 * 10  # a random tiny GPT is near-uniform over the codes
