"""Put the sections of several run_all.py results into one results file (json + md + png), each row marked with
the run it came from: for when the suite ran in more than one call of the device tool (NOTES.md says why).

    python benchmarks/combine.py --out benchmarks/results/h200-2026-11-29 \\
        results/h200-2026-11-29-v9.json:checks,merge results/h200-2026-11-29-v8d.json:inference \\
        results/h200-2026-11-29-v8b.json:train results/h200-2026-11-29-v5.json:unifiedvoice \\
        --rename train_compiled_r8_vs_peft_compiled=train_compiled_r8_gemm_form_vs_peft_compiled

A section given by two runs takes each row from the later one that has it (e.g. the eager rows of a re-run beside
the compiled rows of an earlier run). `--rename OLD=NEW` (in order) renames a row after the sections are taken, e.g. when the default form of a row
changed after the run that measured both forms side by side; the row keeps `renamed_from`. `--row KEY=PATH` then
sets a row from a value the sections carry (PATH: dotted keys into the combined result, e.g.
train_compiled.first_step_s.ours_r8_rank1_form); the row keeps `from`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import bar_chart, markdown  # noqa: E402

# the ratio keys (by prefix) and the result blocks each section of run_all.py writes
ROWS = {"checks": (), "merge": ("merge_ms", "unmerge_ms", "blend4_merge_ms", "restore_bits"),
        "inference": ("decode_", "prefill_"), "train": ("train_", "first_compile_s"),
        "unifiedvoice": ("unifiedvoice_",)}
BLOCKS = {"checks": ("checks",), "merge": ("merge", "merge_tiles"),
          "inference": ("decode_eager", "decode_cuda_graph", "prefill_mixed", "gemv_tiles"),
          "train": ("train_eager", "train_compiled"), "unifiedvoice": ("unifiedvoice",)}


def combine(parts: list[tuple[Path, list[str]]], renames: list[tuple[str, str]],
            rows: list[tuple[str, str]] = ()) -> dict:
    first = json.loads(parts[0][0].read_text())
    out = {k: first[k] for k in ("gpu", "date", "versions")}
    out.update(command="python benchmarks/combine.py " + " ".join(sys.argv[1:]), ratios={}, errors={}, sources={})
    for path, sections in parts:
        res = json.loads(path.read_text())
        run = path.stem.split("-")[-1]
        unknown = [s for s in sections if s not in ROWS]
        if unknown:
            raise SystemExit(f"{path}: unknown sections {unknown}; known: {list(ROWS)}")
        for section in sections:
            for key, entry in res["ratios"].items():
                if key.startswith(ROWS[section]):
                    out["ratios"][key] = dict(entry, run=run)
            for block in BLOCKS[section]:
                if block in res:
                    out[block] = res[block]
            out["errors"].update({k: v for k, v in res.get("errors", {}).items() if k.startswith(section)})
        out["sources"][f"{', '.join(sections)} ({run})"] = f"{path.name}: {res['command']}"
    for old, new in renames:
        if old not in out["ratios"]:
            raise SystemExit(f"--rename {old}={new}: no row {old}")
        out["ratios"][new] = dict(out["ratios"].pop(old), renamed_from=old)
    for key, path in rows:
        value = out
        for part in path.split("."):
            if not isinstance(value, dict) or part not in value:
                raise SystemExit(f"--row {key}={path}: nothing at {part!r}")
            value = value[part]
        out["ratios"][key] = {"value": value, "from": path}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parts", nargs="+", help="RESULTS.json:section,section (sections: " + ", ".join(ROWS) + ")")
    ap.add_argument("--out", required=True, help="stem of the files to write (.json, .md, .png are added)")
    ap.add_argument("--rename", action="append", default=[], help="OLD=NEW: rename a row (applied in order)")
    ap.add_argument("--row", action="append", default=[], help="KEY=PATH: a row from a value the sections carry")
    args = ap.parse_args()
    parts = []
    for p in args.parts:
        path, _, sections = p.rpartition(":")
        if not path:
            raise SystemExit(f"{p}: give RESULTS.json:sections")
        parts.append((Path(path), sections.split(",")))
    renames = [tuple(r.split("=", 1)) for r in args.rename]
    res = combine(parts, renames, [tuple(r.split("=", 1)) for r in args.row])
    stem = Path(args.out)
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(res))
    bar_chart(res, stem.with_suffix(".png"))
    print(markdown(res))


if __name__ == "__main__":
    main()
