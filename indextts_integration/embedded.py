"""The embedded default: a tiny IndexTTS2 checkpoint and a prepared demo voice, made on first use and cached.

scripts/train.py trains on it when it is given no --model-dir and no manifests (and IndexTTS2 imports), so
`python scripts/train.py` shows a real UnifiedVoice LoRA run with nothing downloaded. It lives in
$INDEXTTS_LORA_CACHE (default ~/.cache/indextts-lora)/embedded-default-<version>/: checkpoints/, voice/, prepared/.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
COMPLETE_MARKER = ".complete"
DEMO_UTTERANCES = 12
# Settings that make a short, visible run on this tiny default (flags and --config still win).
SUGGESTED_CONFIG = {"max_steps": 30, "learning_rate": 3e-3, "warmup_steps": 5, "batch_size": 4, "eval_every": 10,
                    "save_every": 30, "adapter_name": "demo"}


@dataclass(frozen=True)
class EmbeddedDefault:
    """Where the embedded model directory and its prepared manifests are."""

    model_dir: Path
    train_manifest: Path
    val_manifest: Path


def upstream_importable() -> bool:
    """Whether upstream IndexTTS2 (indextts2-cli) imports here; the embedded default needs its classes."""
    try:
        import indextts.gpt.model_v2  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not available here"
        return False
    return True


def embedded_root(cache: str | os.PathLike | None = None) -> Path:
    """Folder of the embedded default, keyed by the sources that shape it (a code change makes a new one)."""
    cache = Path(cache or os.environ.get("INDEXTTS_LORA_CACHE", Path.home() / ".cache" / "indextts-lora"))
    h = hashlib.sha1()
    for name in ("tiny_checkpoint.py", "demo_data.py", "demo_sentences.py", "features.py", "prepare.py"):
        h.update((PACKAGE_DIR / name).read_bytes())
    return cache / f"embedded-default-{h.hexdigest()[:10]}"


def embedded_default(cache: str | os.PathLike | None = None, progress: bool = True) -> EmbeddedDefault:
    """The embedded default, made now if absent (about 20 s on a CPU). A marker written last tells a complete
    one from an interrupted one, which is removed and made again."""
    root = embedded_root(cache)
    found = EmbeddedDefault(root / "checkpoints", root / "prepared" / "train_manifest.jsonl",
                            root / "prepared" / "val_manifest.jsonl")
    if (root / COMPLETE_MARKER).is_file():
        return found
    from indextts_integration.demo_data import make_demo_dataset
    from indextts_integration.prepare import PrepareOptions, prepare_dataset
    from indextts_integration.tiny_checkpoint import make_tiny_checkpoint

    shutil.rmtree(root, ignore_errors=True)
    print(f"[embedded default] making a tiny IndexTTS2 checkpoint and a demo voice in {root} (first use only)",
          flush=True)
    make_tiny_checkpoint(found.model_dir, seed=0)
    transcripts = make_demo_dataset(root / "voice", n_utterances=DEMO_UTTERANCES)
    summary = prepare_dataset(PrepareOptions(model_dir=found.model_dir, audio_dir=transcripts.parent,
                                             transcripts=transcripts, output_dir=found.train_manifest.parent,
                                             val_ratio=0.2, device="cpu", progress=progress))
    if summary.train == 0:
        raise RuntimeError(f"the embedded demo voice gave no usable utterance ({summary.reasons}); see "
                           f"{found.train_manifest.parent / 'rejects.jsonl'}")
    (root / COMPLETE_MARKER).write_text("ok\n")
    return found
