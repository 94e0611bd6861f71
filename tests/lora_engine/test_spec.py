"""LoRASpec: glob matching, validation, dict/YAML round trips."""
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_engine import LoRASpec
from lora_engine.spec import path_matches


@pytest.mark.parametrize("pattern,path,hit", [
    ("gpt.h.*.attn.c_attn", "gpt.h.11.attn.c_attn", True),
    ("gpt.h.*.attn.c_attn", "gpt.h.1.2.attn.c_attn", False),  # * is one component
    ("gpt.h.*.mlp.c_*", "gpt.h.0.mlp.c_proj", True),
    ("gpt.**.c_fc", "gpt.h.3.mlp.c_fc", True),
    ("**", "anything.at.all", True),
    ("gpt.h.*", "gpt.h.0.attn", False),
])
def test_path_matches(pattern, path, hit):
    assert path_matches(pattern, path) is hit


@given(st.lists(st.from_regex(r"[a-z_][a-z0-9_]{0,5}", fullmatch=True), min_size=1, max_size=5))
def test_a_path_matches_itself_and_all_stars(parts):
    path = ".".join(parts)
    assert path_matches(path, path)
    assert path_matches(".".join("*" * len(parts)), path)
    assert not path_matches(".".join("*" * (len(parts) + 1)), path)


def test_round_trips(tmp_path):
    spec = LoRASpec(["a.*"], rank=4, alpha=8, dropout=0.1, rank_pattern={"a.x": 2}, use_rslora=True, init="gaussian")
    assert LoRASpec.from_dict(spec.to_dict()) == spec
    import yaml
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"lora": spec.to_dict()}))
    assert LoRASpec.from_yaml(tmp_path / "c.yaml", key="lora") == spec


@pytest.mark.parametrize("kwargs,msg", [
    (dict(target_modules=[]), "empty"), (dict(target_modules=["a"], rank=0), "rank"),
    (dict(target_modules=["a"], alpha=float("nan")), "alpha"), (dict(target_modules=["a"], dropout=1.0), "dropout"),
    (dict(target_modules=["a"], init="xavier"), "init"), (dict(target_modules=["a"], rank_pattern={"b": 1.5}), "rank"),
])
def test_invalid_specs_say_what_is_wrong(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        LoRASpec(**kwargs)


def test_unknown_keys_are_refused():
    with pytest.raises(ValueError, match="unknown LoRASpec keys"):
        LoRASpec.from_dict({"target_modules": ["a"], "r": 8})
