"""scripts/blend.py: an exact stacked-rank blend of adapter files, with provenance, that applied alone equals
the runtime set_blend of its sources; --help explains; bad sources are refused without writing anything."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_engine import LoRASpec, inject_lora, load_adapter, lora_layers, save_adapter, set_blend
from lora_engine.adapter_io import read_adapter_file
from tests.lora_engine.helpers import randomize_lora, reference_layer, tiny_gpt2
from tests.script_loader import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "blend.py"
blend_script = load_script("blend")
IDS = torch.tensor([[1, 5, 9, 2, 33, 7], [4, 4, 60, 0, 12, 3]])


def _voice(path, name, spec, seed, latent=None):
    model = tiny_gpt2()
    inject_lora(model, spec, name)
    torch.manual_seed(seed)
    randomize_lora(model)
    extra = {"speaker_latent": latent} if latent is not None else {}
    save_adapter(model, path, name, extra_tensors=extra)
    return path


@pytest.fixture()
def voices(tmp_path):
    a = _voice(tmp_path / "alice.safetensors", "alice", LoRASpec(["h.*.attn.c_attn", "h.*.mlp.c_fc", "wte"], rank=4,
                                                                   alpha=8), 1, torch.full((2, 3), 1.0))
    b = _voice(tmp_path / "bob.safetensors", "bob", LoRASpec(["h.*.attn.c_attn", "h.0.mlp.c_proj"], rank=2, alpha=3,
                                                              use_rslora=True), 2, torch.full((2, 3), 4.0))
    return a, b


def test_help_explains_the_blend():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, check=True).stdout
    for words in ("--adapter PATH[:WEIGHT]", "--output", "stacked-rank", "set_blend", "provenance"):
        assert words in out


@pytest.mark.parametrize("text, want", [
    ("a.safetensors:0.7", ("a.safetensors", 0.7)), ("a.safetensors", ("a.safetensors", 1.0)),
    ("dir/a.safetensors:-1.5e-1", ("dir/a.safetensors", -0.15)), ("C:\\v\\a.safetensors", ("C:\\v\\a.safetensors", 1.0)),
    ("odd:name.safetensors", ("odd:name.safetensors", 1.0)),
])
def test_parse_source(text, want):
    assert blend_script.parse_source(text) == want


def test_blended_file_applied_alone_equals_runtime_blend_of_sources(tmp_path, voices, capsys):
    a, b = voices
    out = tmp_path / "mix.safetensors"
    assert blend_script.main(["--adapter", f"{a}:0.7", "--adapter", f"{b}:-0.4", "--output", str(out)]) == 0
    assert "rank" in capsys.readouterr().out

    runtime = tiny_gpt2()
    load_adapter(runtime, a)
    load_adapter(runtime, b)
    set_blend(runtime, {"alice": 0.7, "bob": -0.4})
    alone = tiny_gpt2()
    assert load_adapter(alone, out) == "blend"
    with torch.no_grad():
        torch.testing.assert_close(alone(IDS).last_hidden_state, runtime(IDS).last_hidden_state, rtol=1e-5, atol=1e-5)
    for p, layer in lora_layers(alone).items():  # each layer against the float64 weighted sum of its sources
        src = lora_layers(runtime)[p]
        weights = {n: w for n, w in {"alice": 0.7, "bob": -0.4}.items() if n in src.lora_A}
        inp = IDS if p == "wte" else torch.randn(5, layer.in_dim)
        torch.testing.assert_close(layer(inp).double(), reference_layer(src, inp, weights), rtol=1e-5, atol=1e-5)

    tensors, doc = read_adapter_file(out)
    assert doc["targets"]["h.0.attn.c_attn"]["rank"] == 6 and doc["targets"]["h.0.mlp.c_fc"]["rank"] == 4
    assert doc["targets"]["h.0.mlp.c_proj"]["rank"] == 2 and doc["targets"]["h.0.attn.c_attn"]["scale"] == 1.0
    sources = doc["provenance"]["blend"]["sources"]
    assert [(s["file"], s["adapter"], s["weight"]) for s in sources] == [
        ("alice.safetensors", "alice", 0.7), ("bob.safetensors", "bob", -0.4)]
    assert sources[0]["file_sha256"] == hashlib.sha256(a.read_bytes()).hexdigest()
    assert sources[1]["tensors_sha256"] == read_adapter_file(b)[1]["tensors_sha256"]
    assert doc["base_fingerprint"]["modules"]["h.0.attn.c_attn"] == \
        read_adapter_file(a)[1]["base_fingerprint"]["modules"]["h.0.attn.c_attn"]
    torch.testing.assert_close(tensors["extra.speaker_latent"], torch.full((2, 3), 0.7 - 1.6))
    json.dumps(doc)  # the whole header is plain JSON


def test_sources_made_for_different_bases_are_refused(tmp_path, voices, capsys):
    a, _ = voices
    other = tiny_gpt2(seed=5)
    inject_lora(other, LoRASpec(["h.0.attn.c_attn"], rank=2), "carol")
    save_adapter(other, tmp_path / "carol.safetensors", "carol")
    out = tmp_path / "mix.safetensors"
    argv = ["--adapter", str(a), "--adapter", str(tmp_path / "carol.safetensors"), "--output", str(out)]
    assert blend_script.main(argv) == 2
    assert "different base fingerprint" in capsys.readouterr().err and not out.exists()
    with pytest.warns(UserWarning, match=r"left out of the blend: \['speaker_latent'\]"):  # carol has none
        assert blend_script.main(argv + ["--allow-different-base"]) == 0 and out.exists()
    assert read_adapter_file(out)[1]["provenance"]["blend"]["extra_tensors_left_out"] == ["speaker_latent"]


def test_a_bad_source_file_is_refused(tmp_path, voices, capsys):
    a, _ = voices
    (tmp_path / "bad.safetensors").write_bytes(b"\x80\x04not an adapter")
    out = tmp_path / "mix.safetensors"
    assert blend_script.main(["--adapter", str(a), "--adapter", str(tmp_path / "bad.safetensors"), "--output",
                              str(out)]) == 2
    assert "pickle" in capsys.readouterr().err and not out.exists()
