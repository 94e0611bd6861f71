"""benchmarks/combine.py: one results file from the sections of several runs, every row marked with its run."""
import json

import pytest

from benchmarks.combine import combine


def _run(path, command, ratios, **blocks):
    path.write_text(json.dumps({"gpu": "h200", "date": "2026-11-29", "versions": {"torch": "2.11"},
                                "command": command, "ratios": ratios, "errors": {}, **blocks}))
    return path


def test_sections_come_from_their_runs_with_renames_and_rows(tmp_path):
    a = _run(tmp_path / "h200-2026-11-29-v9.json", "run_all --only checks merge",
             {"merge_ms": {"value": 2.7}, "unmerge_ms": {"value": 1.2}, "train_eager_r8_vs_peft": {"value": 9.9}},
             merge={"kept": 1})
    b = _run(tmp_path / "h200-2026-11-29-v8b.json", "run_all --only train",
             {"train_eager_r8_vs_peft": {"value": 0.92}, "merge_ms": {"value": 99.0},
              "train_compiled_r8_vs_peft_compiled": {"value": 1.02},
              "train_compiled_r8_rank1_form_vs_peft_compiled": {"value": 0.91}},
             train_compiled={"first_step_s": {"ours_r8_rank1_form": 129.4}})
    res = combine([(a, ["checks", "merge"]), (b, ["train"])],
                  [("train_compiled_r8_vs_peft_compiled", "train_compiled_r8_gemm_form_vs_peft_compiled"),
                   ("train_compiled_r8_rank1_form_vs_peft_compiled", "train_compiled_r8_vs_peft_compiled")],
                  [("first_compile_s", "train_compiled.first_step_s.ours_r8_rank1_form")])
    r = res["ratios"]
    assert r["merge_ms"] == {"value": 2.7, "run": "v9"}  # not the train run's merge row
    assert r["train_eager_r8_vs_peft"] == {"value": 0.92, "run": "v8b"}  # not the merge run's train row
    assert r["train_compiled_r8_vs_peft_compiled"]["value"] == 0.91
    assert r["train_compiled_r8_vs_peft_compiled"]["renamed_from"] == "train_compiled_r8_rank1_form_vs_peft_compiled"
    assert r["train_compiled_r8_gemm_form_vs_peft_compiled"]["value"] == 1.02
    assert r["first_compile_s"]["value"] == 129.4
    assert res["merge"] == {"kept": 1} and "train_compiled" in res
    assert set(res["sources"]) == {"checks, merge (v9)", "train (v8b)"}


def test_a_later_run_of_a_section_overrides_only_the_rows_it_has(tmp_path):
    early = _run(tmp_path / "h200-2026-11-29-v8b.json", "run_all --only train",
                 {"train_eager_r8_vs_peft": {"value": 0.92}, "train_compiled_r8_vs_peft_compiled": {"value": 0.91}})
    late = _run(tmp_path / "h200-2026-11-29-v10.json", "run_all --only train --no-compile",
                {"train_eager_r8_vs_peft": {"value": 0.79}})
    res = combine([(early, ["train"]), (late, ["train"])], [])
    assert res["ratios"]["train_eager_r8_vs_peft"] == {"value": 0.79, "run": "v10"}
    assert res["ratios"]["train_compiled_r8_vs_peft_compiled"] == {"value": 0.91, "run": "v8b"}
    assert set(res["sources"]) == {"train (v8b)", "train (v10)"}


def test_unknown_section_rename_or_row_is_refused(tmp_path):
    a = _run(tmp_path / "h200-2026-11-29-v9.json", "run_all", {"merge_ms": {"value": 2.7}})
    with pytest.raises(SystemExit, match="unknown sections"):
        combine([(a, ["merges"])], [])
    with pytest.raises(SystemExit, match="no row unmerge_ms"):
        combine([(a, ["merge"])], [("unmerge_ms", "x")])
    with pytest.raises(SystemExit, match="nothing at 'train_compiled'"):
        combine([(a, ["merge"])], [], [("first_compile_s", "train_compiled.first_step_s.x")])
