"""Run the whole benchmark suite in one process and write results/<gpu>-<date>.{json,md,png}.

    python benchmarks/run_all.py            # on the GPU machine (about 5 minutes)
    python benchmarks/run_all.py --check    # also assert fast paths / kernels == reference on the GPU
    python benchmarks/run_all.py --tiny     # a CPU smoke test of the harness itself (numbers mean nothing)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import traceback
import zipfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import bench_inference, bench_merge, bench_train, checks, report  # noqa: E402
from benchmarks.harness import apply_train_tiles, gpu_name  # noqa: E402

SECTIONS = {"checks": checks.run, "merge": bench_merge.run, "inference": bench_inference.run, "train": bench_train.run}


def versions() -> dict:
    out = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("transformers", "peft", "triton"):
        try:
            out[name] = __import__(name).__version__
        except Exception:
            out[name] = None
    return out


def uv_site_path(uv_site: str, scratch: Path) -> str:
    """`--uv-site` as a PYTHONPATH entry: a site directory as it is, or a folder of wheels (what
    benchmarks/fetch_uv_wheels.sh downloads) unpacked into `scratch`."""
    wheels = sorted(Path(uv_site).glob("*.whl"))
    if not wheels:
        return uv_site
    for wheel in wheels:  # a wheel is a zip of its site-packages tree: unpacking it is installing it --no-deps
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(scratch)
    return str(scratch)


def _uv_memory(env: dict, checkpointing: bool, tiny: bool) -> dict:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "unifiedvoice_memory.py")] + (["--tiny"] if tiny else [])
    p = subprocess.run(cmd + (["--checkpointing"] if checkpointing else []), env=env, capture_output=True, text=True,
                       timeout=600)
    line = next((l for l in reversed(p.stdout.splitlines()) if l.startswith("{")), None)
    if p.returncode or line is None:
        hint = ("" if "No module named 'indextts'" not in p.stderr else " -- upstream IndexTTS2 is not importable: "
                "pass --uv-site (a site directory, or the wheels benchmarks/fetch_uv_wheels.sh downloads)")
        raise RuntimeError(f"unifiedvoice_memory.py failed (rc {p.returncode}){hint}: {p.stderr[-1500:]}")
    return json.loads(line)


def unifiedvoice_row(res: dict, args) -> None:
    """The full-size UnifiedVoice memory row, in a subprocess with upstream's transformers on PYTHONPATH."""
    env = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="uv-site-") as scratch:  # unpacked wheels, removed after the row
        if args.uv_site:
            env["PYTHONPATH"] = os.pathsep.join([uv_site_path(args.uv_site, Path(scratch)), str(ROOT)])
        rows = {("checkpointing" if ckpt else "no_checkpointing"): _uv_memory(env, ckpt, args.tiny)
                for ckpt in (False, True)}
    res["unifiedvoice"] = rows
    for name, row in rows.items():
        key = "unifiedvoice_train_peak_gb" + ("" if name == "checkpointing" else "_no_checkpointing")
        res["ratios"][key] = {"value": row["unifiedvoice_train_peak_gb"],
                              **{k: v for k, v in row.items() if k != "unifiedvoice_train_peak_gb"}}


def write(res: dict, stem: Path) -> None:
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1))
    stem.with_suffix(".md").write_text(report.markdown(res))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=None, help=f"sections to run: {list(SECTIONS) + ['unifiedvoice']}")
    ap.add_argument("--check", action="store_true", help="assert fast paths and kernels match the reference on the GPU")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--compiled-forms", nargs="*", default=None,
                    help="compiled training: time only these of the other compiled_op.FORMS beside the default")
    ap.add_argument("--restore-cycles", type=int, default=1000)
    ap.add_argument("--restore-budget-s", type=float, default=60.0)
    ap.add_argument("--uv-site", default=os.environ.get("UV_SITE"),
                    help="for the UnifiedVoice row: a PYTHONPATH entry with indextts + transformers 4.52, or a folder "
                         "of their wheels (benchmarks/fetch_uv_wheels.sh); default $UV_SITE")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--tag", default="")
    ap.add_argument("--gemv-tiles", default=None, help="a tune_gemv.py --out JSON: decode with its least-time tiles "
                                                       "per shape (over lora_gemv_triton.TUNED)")
    ap.add_argument("--merge-tiles", default=None, help="a tune_merge.py --out JSON: merge and unmerge with its best "
                                                        "merge tile and unmerge tile (over merge_triton.CONFIG)")
    ap.add_argument("--train-tiles", default=None, help="a tune_train.py --out JSON: the fused training kernels with "
                                                        "its best tiles per shape and pass (over lora_train_triton.TUNED)")
    ap.add_argument("--no-tma", action="store_true", help="the fused training GEMMs load through pointers, not TMA "
                                                          "descriptors (to compare)")
    args = ap.parse_args()
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    res = {"gpu": gpu_name(), "date": date, "versions": versions(), "command": " ".join(["python"] + sys.argv),
           "ratios": {}, "errors": {}, "section_seconds": {}}
    if args.gemv_tiles:
        from lora_engine.kernels import lora_gemv_triton
        tiles = json.loads(Path(args.gemv_tiles).read_text())["tuned"]
        for shape, cfg in tiles.items():
            n_in, n_out = map(int, shape.split("x"))
            lora_gemv_triton.set_config(n_in, n_out, cfg)
        res["gemv_tiles"] = tiles
    if args.merge_tiles:
        from lora_engine.kernels import merge_triton
        best = json.loads(Path(args.merge_tiles).read_text())["best"]
        tiles = {k: v for part in ("merge_tile", "unmerge_tile") for k, v in best[part].items()
                 if k in merge_triton.CONFIG}
        merge_triton.CONFIG.update(tiles)
        res["merge_tiles"] = tiles
    if args.train_tiles or args.no_tma:
        res["train_tiles"] = apply_train_tiles(args.train_tiles, tma=not args.no_tma)
        res["train_tma"] = not args.no_tma
    wanted = args.only or (list(SECTIONS) + ["unifiedvoice"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{res['gpu']}-{date}{args.tag}"
    for name in wanted:
        if name == "checks" and not args.check:
            continue
        fn = unifiedvoice_row if name == "unifiedvoice" else SECTIONS[name]
        t0 = datetime.datetime.now()
        try:
            fn(res, args)
        except Exception as e:
            res["errors"][name] = f"{e!r}\n{traceback.format_exc()[-2000:]}"
            print(f"section {name} failed: {e!r}", file=sys.stderr)
            if name == "checks":
                raise
        res["section_seconds"][name] = (datetime.datetime.now() - t0).total_seconds()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        print(f"[{name}] done in {res['section_seconds'][name]:.1f}s", flush=True)
        write(res, stem)  # after every section: a run cut short keeps what it measured

    try:
        report.bar_chart(res, stem.with_suffix(".png"))
    except Exception as e:
        print(f"no chart: {e!r}", file=sys.stderr)
    print(report.markdown(res))


if __name__ == "__main__":
    main()
