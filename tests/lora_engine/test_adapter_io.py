"""Adapter files: exact round trips, readable header, enforced base fingerprint, refusal of bad files with
the model byte-identical afterwards, loading onto merged models, exact blended files, atomic writes."""
import json
import os
import pickle

import pytest
import safetensors
import safetensors.torch
import torch
from hypothesis import given
from hypothesis import strategies as st

from lora_engine import (LoRASpec, adapter_names, get_blend, inject_lora, load_adapter, lora_layers, merge,
                         remove_adapter, save_adapter, set_blend, unmerge)
from lora_engine.adapter_io import (AdapterFileError, BaseMismatchError, adapter_extras, adapter_metadata,
                                    read_adapter_file, tensors_sha256)
from lora_engine import atomic
from lora_engine.atomic import atomic_open, atomic_write_bytes
from lora_engine.merge import base_weight
from tests.lora_engine.helpers import Stack, randomize_lora, reference_layer, tiny_gpt2

GPT2_TARGETS = ["h.*.attn.c_attn", "h.*.attn.c_proj", "h.*.mlp.c_fc", "wte"]
IDS = torch.tensor([[1, 5, 9, 2, 33, 7], [4, 4, 60, 0, 12, 3]])


def _gpt2_alice(dtype=torch.float32, seed=0):
    model = tiny_gpt2(seed=seed).to(dtype)
    spec = LoRASpec(GPT2_TARGETS, rank=4, alpha=8, rank_pattern={"h.1.*.*": 2}, alpha_pattern={"wte": 3.0})
    inject_lora(model, spec, "alice")
    randomize_lora(model)
    return model


def _out(model, ids=IDS):
    with torch.no_grad():
        return model(ids).last_hidden_state


def _state(model):
    """Everything a refused load must leave alone: parameter bytes and identity, module types, flags, blend."""
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "params": [(n, id(p), p.requires_grad) for n, p in model.named_parameters()],
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "adapters": adapter_names(model), "blend": dict(get_blend(model)),
        "merged": [layer.merged is not None for layer in lora_layers(model).values()],
    }


def _assert_unchanged(model, before):
    after = _state(model)
    assert after["tensors"].keys() == before["tensors"].keys()
    for k, v in before["tensors"].items():
        assert torch.equal(after["tensors"][k].view(torch.uint8), v.view(torch.uint8)), k
    for key in ("params", "modules", "adapters", "blend", "merged"):
        assert after[key] == before[key], key


def _rewrite(src, dst, edit_tensors=None, edit_doc=None, fix_checksum=True):
    """Write a copy of an adapter file with its tensors / header edited (checksum recomputed unless told not to)."""
    tensors, doc = read_adapter_file(src)
    if edit_tensors:
        edit_tensors(tensors)
    if edit_doc:
        edit_doc(doc)
    if fix_checksum:
        doc["tensors_sha256"] = tensors_sha256(tensors)
    safetensors.torch.save_file(tensors, str(dst), metadata={"lora_engine": json.dumps(doc)})
    return dst


# ---- round trips --------------------------------------------------------------------------------
def test_gpt2_round_trip_is_bit_exact_and_header_is_readable(tmp_path):
    model = _gpt2_alice()
    want = _out(model)
    path = tmp_path / "alice.safetensors"
    save_adapter(model, path, "alice", training_summary={"steps": 120, "val_loss": 1.25})

    fresh = tiny_gpt2()
    assert load_adapter(fresh, path) == "alice"
    assert torch.equal(_out(fresh), want)
    for p, layer in lora_layers(model).items():
        other = lora_layers(fresh)[p]
        assert torch.equal(other.lora_A["alice"], layer.lora_A["alice"])
        assert torch.equal(other.lora_B["alice"], layer.lora_B["alice"])
        assert other.scaling["alice"] == layer.scaling["alice"]
    # the float64 reference of one layer with the loaded adapter
    layer = lora_layers(fresh)["h.0.attn.c_attn"]
    x = torch.randn(3, 32)
    torch.testing.assert_close(layer(x).double(), reference_layer(layer, x, {"alice": 1.0}), rtol=1e-5, atol=1e-5)

    # the header is plain JSON a person can read with safetensors alone
    with safetensors.safe_open(str(path), "pt") as f:
        doc = json.loads(f.metadata()["lora_engine"])
        keys = set(f.keys())
    assert doc["format_version"] == 1 and doc["adapter"] == "alice"
    assert LoRASpec.from_dict(doc["spec"]) == LoRASpec(GPT2_TARGETS, rank=4, alpha=8, rank_pattern={"h.1.*.*": 2},
                                                        alpha_pattern={"wte": 3.0})
    assert doc["targets"]["h.1.attn.c_attn"] == {
        "base_kind": "Conv1D", "base_shape": [32, 96], "base_dtype": "float32", "in_features": 32,
        "out_features": 96, "rank": 2, "alpha": 8, "scale": 4.0}
    assert doc["targets"]["wte"]["base_kind"] == "Embedding" and doc["targets"]["wte"]["scale"] == 0.75
    assert set(doc["base_fingerprint"]["modules"]["wte"]) == {"float32", "float16", "bfloat16"}
    assert doc["training_summary"] == {"steps": 120, "val_loss": 1.25}
    assert keys == {f"{p}.lora_{ab}" for p in doc["targets"] for ab in "AB"}
    assert adapter_metadata(fresh, "alice")["tensors_sha256"] == doc["tensors_sha256"]


@given(dims=st.tuples(st.integers(2, 9), st.integers(2, 9), st.integers(2, 9)), rank=st.integers(1, 6),
       conv_rank=st.integers(1, 6), alpha=st.floats(0.25, 64), rslora=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
def test_round_trip_any_shape_rank_and_dtype(tmp_path_factory, dims, rank, conv_rank, alpha, rslora, dtype):
    dim, vocab, out = dims
    torch.manual_seed(rank * 100 + conv_rank)
    model = Stack(dim, vocab, out).to(dtype)
    spec = LoRASpec(["emb", "lin", "conv"], rank=rank, alpha=alpha, use_rslora=rslora, rank_pattern={"conv": conv_rank})
    inject_lora(model, spec, "v")
    randomize_lora(model)
    idx = torch.randint(0, vocab, (3, 5))
    path = tmp_path_factory.mktemp("rt") / "v.safetensors"
    save_adapter(model, path, "v")
    fresh = Stack(dim, vocab, out).to(dtype)
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if ".lora_" not in k}, strict=False)
    load_adapter(fresh, path, adapter="w")
    assert torch.equal(fresh(idx), model(idx))
    assert {p: layer.scaling["w"] for p, layer in lora_layers(fresh).items()} == \
        {p: layer.scaling["v"] for p, layer in lora_layers(model).items()}


def test_extra_tensors_and_provenance_travel_with_the_adapter(tmp_path):
    model = _gpt2_alice()
    latent = torch.randn(32, 32)
    save_adapter(model, tmp_path / "a.safetensors", "alice", extra_tensors={"speaker_latent": latent},
                 provenance={"dataset": "alice_20min", "commit": "abc123"})
    tensors, doc = read_adapter_file(tmp_path / "a.safetensors")
    assert torch.equal(tensors["extra.speaker_latent"], latent)
    assert doc["extra_tensors"] == {"speaker_latent": {"shape": [32, 32], "dtype": "float32"}}
    assert doc["provenance"] == {"dataset": "alice_20min", "commit": "abc123"}

    fresh = tiny_gpt2()
    load_adapter(fresh, tmp_path / "a.safetensors")
    assert torch.equal(adapter_extras(fresh, "alice")["speaker_latent"], latent)
    save_adapter(fresh, tmp_path / "b.safetensors", "alice")  # extras kept on re-save
    assert torch.equal(read_adapter_file(tmp_path / "b.safetensors")[0]["extra.speaker_latent"], latent)
    remove_adapter(fresh, "alice")
    inject_lora(fresh, LoRASpec(["wte"], rank=2), "alice")  # same name, new adapter: no stale extras
    assert adapter_extras(fresh, "alice") == {}


# ---- merged models --------------------------------------------------------------------------------
def test_save_and_load_on_a_merged_model(tmp_path):
    model = _gpt2_alice()
    save_adapter(model, tmp_path / "unmerged.safetensors", "alice")
    merge(model)
    want = _out(model)
    merged_bits = {k: v.clone() for k, v in model.state_dict().items()}
    for layer in lora_layers(model).values():  # base_weight is what unmerge will write back
        assert not torch.equal(base_weight(layer), layer.weight)
    save_adapter(model, tmp_path / "merged.safetensors", "alice")
    a_doc, b_doc = read_adapter_file(tmp_path / "unmerged.safetensors")[1], read_adapter_file(tmp_path / "merged.safetensors")[1]
    assert a_doc["base_fingerprint"] == b_doc["base_fingerprint"] and a_doc["tensors_sha256"] == b_doc["tensors_sha256"]

    # load a second adapter while merged: accepted (fingerprint of the unmerged base), weights untouched
    other = tiny_gpt2()
    inject_lora(other, LoRASpec(["h.*.mlp.c_proj", "h.0.attn.c_attn"], rank=3), "bob")
    randomize_lora(other)
    bob_out = _out(other)
    save_adapter(other, tmp_path / "bob.safetensors", "bob")
    assert load_adapter(model, tmp_path / "bob.safetensors") == "bob"
    assert all(torch.equal(v, merged_bits[k]) for k, v in model.state_dict().items() if k in merged_bits)
    assert torch.equal(_out(model), want)  # the merged mix keeps running; bob is added inactive
    assert get_blend(model) == {"alice": 1.0}
    unmerge(model)
    for k, v in model.state_dict().items():
        if ".lora_" not in k:
            assert torch.equal(v, other.state_dict()[k]), k  # same base, bit for bit
    set_blend(model, {"bob": 1.0})
    assert torch.equal(_out(model), bob_out)


# ---- the base fingerprint -------------------------------------------------------------------------
def test_wrong_base_is_refused_naming_the_modules_and_forced_with_a_warning(tmp_path):
    save_adapter(_gpt2_alice(), tmp_path / "a.safetensors", "alice")
    model = tiny_gpt2()
    with torch.no_grad():
        model.h[1].attn.c_attn.weight[3, 4] += 1e-3  # one element of one targeted module
    before = _state(model)
    with pytest.raises(BaseMismatchError, match=r"1 of 7 targeted modules: \['h\.1\.attn\.c_attn") as e:
        load_adapter(model, tmp_path / "a.safetensors")
    assert "strict_base=False" in str(e.value)
    _assert_unchanged(model, before)
    with pytest.warns(UserWarning, match="h.1.attn.c_attn"):
        load_adapter(model, tmp_path / "a.safetensors", strict_base=False)
    assert "alice" in adapter_names(model)


@pytest.mark.parametrize("deploy", [torch.float16, torch.bfloat16])
def test_fp32_trained_adapter_loads_on_a_half_precision_deploy_of_the_same_base(tmp_path, deploy):
    save_adapter(_gpt2_alice(), tmp_path / "a.safetensors", "alice")
    load_adapter(tiny_gpt2().to(deploy), tmp_path / "a.safetensors")  # IndexTTS2 does model.half()
    wrong = tiny_gpt2(seed=3).to(deploy)
    with pytest.raises(BaseMismatchError, match=f"compared as {str(deploy)[6:]}"):
        load_adapter(wrong, tmp_path / "a.safetensors")


def test_half_trained_adapter_checks_an_fp32_base_at_its_own_precision(tmp_path):
    save_adapter(_gpt2_alice(torch.float16), tmp_path / "h.safetensors", "alice")
    assert set(read_adapter_file(tmp_path / "h.safetensors")[1]["base_fingerprint"]["modules"]["wte"]) == {"float16"}
    load_adapter(tiny_gpt2().half().float(), tmp_path / "h.safetensors")  # same fp16 values, held in fp32
    with pytest.raises(BaseMismatchError, match="compared as float16"):
        load_adapter(tiny_gpt2(seed=1), tmp_path / "h.safetensors")


# ---- bad input: refused, model byte-identical -------------------------------------------------------
def _first(d):
    return next(iter(d))


BAD_FILES = {
    "truncated": lambda good, dst: _write(dst, good.read_bytes()[:-37]),
    "truncated_header": lambda good, dst: _write(dst, good.read_bytes()[:100]),
    "empty": lambda good, dst: _write(dst, b""),
    "corrupt_data": lambda good, dst: _write(dst, _flip(good.read_bytes(), -9)),
    "corrupt_header": lambda good, dst: _write(dst, _flip(good.read_bytes(), 8)),
    "pickle": lambda good, dst: _write(dst, pickle.dumps({"a": torch.zeros(2)})),
    "torch_save_zip": lambda good, dst: torch.save(read_adapter_file(good)[0], dst) or dst,
    "plain_safetensors": lambda good, dst: safetensors.torch.save_file(read_adapter_file(good)[0], str(dst)) or dst,
    "missing_key": lambda good, dst: _rewrite(good, dst, lambda t: t.pop("h.0.attn.c_proj.lora_B")),
    "unexpected_key": lambda good, dst: _rewrite(good, dst, lambda t: t.update({"h.0.attn.c_proj.bias": torch.ones(3)})),
    "wrong_shape": lambda good, dst: _rewrite(good, dst, lambda t: t.update(
        {"h.0.mlp.c_fc.lora_A": torch.zeros(4, 31)})),
    "rank_differs_from_metadata": lambda good, dst: _rewrite(good, dst, lambda t: t.update(
        {"h.0.mlp.c_fc.lora_A": torch.zeros(3, 32), "h.0.mlp.c_fc.lora_B": torch.zeros(128, 3)})),
    "nan": lambda good, dst: _rewrite(good, dst, lambda t: t["h.1.mlp.c_fc.lora_B"].__setitem__((0, 0), float("nan"))),
    "inf": lambda good, dst: _rewrite(good, dst, lambda t: t["wte.lora_A"].__setitem__((1, 2), float("-inf"))),
    "stale_checksum": lambda good, dst: _rewrite(good, dst, lambda t: t["wte.lora_A"].add_(1e-3), fix_checksum=False),
    "newer_format": lambda good, dst: _rewrite(good, dst, edit_doc=lambda d: d.update(format_version=99)),
    "malformed_header": lambda good, dst: _rewrite(good, dst, edit_doc=lambda d: d["targets"]["wte"].pop("rank")),
    "target_not_in_model": lambda good, dst: _rewrite(good, dst, _rename("h.1.attn.c_proj", "h.7.attn.c_proj"),
                                                      _rename_doc("h.1.attn.c_proj", "h.7.attn.c_proj")),
    "target_of_another_kind": lambda good, dst: _rewrite(good, dst, _rename("h.1.attn.c_proj", "h.1.ln_1"),
                                                         _rename_doc("h.1.attn.c_proj", "h.1.ln_1")),
    "target_of_another_size": lambda good, dst: _rewrite(good, dst, _rename("h.1.attn.c_proj", "h.1.mlp.c_proj"),
                                                         _rename_doc("h.1.attn.c_proj", "h.1.mlp.c_proj")),
    "kind_differs_from_header": lambda good, dst: _rewrite(
        good, dst, edit_doc=lambda d: d["targets"]["wte"].update(base_kind="Conv1D")),
}
ERRORS = {
    "truncated": "truncated or corrupt", "truncated_header": "not a safetensors", "empty": "not a safetensors",
    "corrupt_data": "checksum", "corrupt_header": "corrupt", "pickle": "pickle; it will not be unpickled",
    "torch_save_zip": "zip archive", "plain_safetensors": "not a lora_engine adapter",
    "missing_key": r"missing \['h\.0\.attn\.c_proj\.lora_B'\]", "unexpected_key": r"unexpected \['h\.0\.attn\.c_proj\.bias'\]",
    "wrong_shape": "wrong shapes", "rank_differs_from_metadata": "rank differs from the header: header says rank 4",
    "nan": r"NaN/inf values in \['h\.1\.mlp\.c_fc\.lora_B'\]", "inf": r"NaN/inf values in \['wte\.lora_A'\]",
    "stale_checksum": "checksum", "newer_format": "newer lora_engine", "malformed_header": "malformed",
    "target_not_in_model": r"do not exist in this model: \['h\.7\.attn\.c_proj'\]. Closest module names: \[.*h\.1\.attn\.c_proj",
    "target_of_another_kind": "h.1.ln_1 is a LayerNorm",
    "target_of_another_size": r"h\.1\.mlp\.c_proj: the model's Conv1D has \(in, out\) = \(128, 32\), the adapter expects \(32, 32\)",
    "kind_differs_from_header": "wte is a Embedding",
}


def _write(dst, data: bytes):
    dst.write_bytes(data)
    return dst


def _flip(data: bytes, at: int) -> bytes:
    b = bytearray(data)
    b[at] ^= 0x5A
    return bytes(b)


def _rename(old, new):
    def edit(t):
        for ab in "AB":
            t[f"{new}.lora_{ab}"] = t.pop(f"{old}.lora_{ab}")
    return edit


def _rename_doc(old, new):
    def edit(d):
        d["targets"][new] = d["targets"].pop(old)
        d["base_fingerprint"]["modules"][new] = d["base_fingerprint"]["modules"].pop(old)
    return edit


@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "alice.safetensors"
    save_adapter(_gpt2_alice(), path, "alice")
    return path


@pytest.mark.parametrize("merged", [False, True], ids=["plain", "merged"])
@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_is_refused_and_model_is_byte_identical(tmp_path, good_file, case, merged):
    bad = BAD_FILES[case](good_file, tmp_path / f"{case}.safetensors")
    model = tiny_gpt2()  # the right base, already carrying another adapter
    inject_lora(model, LoRASpec(["h.0.attn.c_attn", "h.1.mlp.c_proj"], rank=2), "bob")
    randomize_lora(model)
    if merged:
        merge(model)
    before = _state(model)
    with pytest.raises(AdapterFileError, match=ERRORS[case]):
        load_adapter(model, bad)
    _assert_unchanged(model, before)


def test_directory_and_missing_file_are_refused(tmp_path):
    with pytest.raises(AdapterFileError, match="import_peft"):
        load_adapter(tiny_gpt2(), tmp_path)
    with pytest.raises(FileNotFoundError):
        load_adapter(tiny_gpt2(), tmp_path / "nope.safetensors")


def test_name_clash_is_refused_before_anything(tmp_path, good_file):
    model = tiny_gpt2()
    inject_lora(model, LoRASpec(["wte"], rank=2), "alice")
    before = _state(model)
    with pytest.raises(ValueError, match="already in the model"):
        load_adapter(model, good_file)
    _assert_unchanged(model, before)
    assert load_adapter(model, good_file, adapter="alice2") == "alice2"


def test_a_failure_half_way_through_is_rolled_back(tmp_path, good_file, monkeypatch):
    model = tiny_gpt2()
    inject_lora(model, LoRASpec(["h.0.attn.c_attn", "h.1.mlp.c_proj"], rank=2), "bob")
    set_blend(model, {"bob": 0.5})
    for n, p in model.named_parameters():
        p.requires_grad_(n.endswith("bob"))
    before = _state(model)
    calls = {"n": 0}
    original = torch.Tensor.copy_

    def failing_copy(self, src, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated failure (e.g. out of memory)")
        return original(self, src, *a, **k)

    monkeypatch.setattr(torch.Tensor, "copy_", failing_copy)
    with pytest.raises(RuntimeError, match="simulated"):
        load_adapter(model, good_file)
    monkeypatch.undo()
    assert calls["n"] >= 5
    _assert_unchanged(model, before)


# ---- saving ----------------------------------------------------------------------------------------
def test_saving_refuses_non_finite_adapters_and_writes_nothing(tmp_path):
    model = _gpt2_alice()
    with torch.no_grad():
        lora_layers(model)["wte"].lora_B["alice"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN/inf values in \['wte\.lora_B'\]"):
        save_adapter(model, tmp_path / "x.safetensors", "alice")
    assert list(tmp_path.iterdir()) == []


def test_blended_file_applied_alone_equals_the_runtime_blend(tmp_path):
    model = _gpt2_alice()
    inject_lora(model, LoRASpec(["h.*.attn.c_attn", "h.0.mlp.c_fc"], rank=3, alpha=5, use_rslora=True), "bob")
    randomize_lora(model)
    weights = {"alice": 0.7, "bob": -0.45}
    doc = save_adapter(model, tmp_path / "mix.safetensors", weights)
    set_blend(model, weights)
    want = _out(model)
    assert doc["targets"]["h.0.attn.c_attn"]["rank"] == 7 and doc["targets"]["h.0.attn.c_attn"]["scale"] == 1.0
    assert [(s["adapter"], s["weight"]) for s in doc["provenance"]["blend"]["sources"]] == list(weights.items())

    fresh = tiny_gpt2()
    assert load_adapter(fresh, tmp_path / "mix.safetensors") == "blend"
    torch.testing.assert_close(_out(fresh), want, rtol=1e-5, atol=1e-5)
    # each blended layer against the float64 sum of its sources
    x = torch.randn(4, 32)
    for p, layer in lora_layers(fresh).items():
        source = lora_layers(model)[p]
        ref = reference_layer(source, x if p != "wte" else IDS, {n: w for n, w in weights.items() if n in source.lora_A})
        torch.testing.assert_close(layer(x if p != "wte" else IDS).double(), ref, rtol=1e-5, atol=1e-5)


def test_saving_a_per_row_blend_is_refused(tmp_path):
    model = _gpt2_alice()
    with pytest.raises(ValueError, match="finite floats"):
        save_adapter(model, tmp_path / "x.safetensors", {"alice": torch.tensor([1.0, 0.5])})


# ---- atomic writes ---------------------------------------------------------------------------------
def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError):
        with atomic_open(target) as f:
            f.write(b"half of the new conte")
            raise RuntimeError("crash while writing")
    assert target.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["f.bin"]  # no temporary file left behind
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert target.stat().st_mode & 0o777 == 0o666 & ~atomic._UMASK  # not mkstemp's 0600


def test_failed_save_keeps_the_previous_adapter_file(tmp_path, monkeypatch):
    model = _gpt2_alice()
    path = tmp_path / "a.safetensors"
    save_adapter(model, path, "alice")
    good = path.read_bytes()

    def failing_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "fsync", failing_fsync)
    with torch.no_grad():
        lora_layers(model)["wte"].lora_A["alice"].add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, path, "alice")
    monkeypatch.undo()
    assert path.read_bytes() == good and sorted(os.listdir(tmp_path)) == ["a.safetensors"]
