"""Data-parallel scaling of LoRA training on a full-size UnifiedVoice (upstream class, random weights), run the way a
user runs it: `torchrun --nproc_per_node=N scripts/train.py --model-dir ...` on a prepared-style manifest.

    python benchmarks/ddp_scaling.py --gpus 1 2 --out benchmarks/results/h200x2-DATE-ddp     # 2 GPUs, ~4 minutes
    python benchmarks/ddp_scaling.py --tiny --device cpu --amp none --gpus 1 2 --steps 4 --warmup 1 --out /tmp/ddp
                                                                # a CPU smoke test (gloo); numbers mean nothing

For each N the per-GPU batch is fixed (--batch-size), so the global batch grows with N. Step time = median of the
loop's own per-step times (metrics.jsonl `step_time_s`) after --warmup steps; samples/s = N * batch / step time;
scaling efficiency = samples/s(N) / (N * samples/s(1)). Peak memory per GPU is the loop's last metrics line.
Equivalence: one process with --grad-accum N_max sees exactly the global batches of N_max processes (the batch
stream is sharded that way, lora_engine/training/data.py), so after the same steps their adapters must agree tensor
by tensor as closely as the one-process run agrees with itself when repeated (bf16 kernels do not repeat to the bit;
in fp32 on the CPU the two agree exactly).

Writes OUT.json, OUT.md and OUT.png. The model directory (config.yaml + gpt.pth) and the synthetic features are
made under --work (random, never zero; ~100 text + ~500 mel tokens per example, as benchmarks/unifiedvoice_memory.py).
Upstream pins transformers 4.52: put an install of indextts2-cli + transformers 4.52.1 on PYTHONPATH (--uv-site).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.unifiedvoice_memory import FULL_GPT  # noqa: E402

# NVLink multicast stays off: a program that uses it can take a shared host's GPUs out of service (device notes).
NCCL_SAFETY = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
EQUIVALENCE_RTOL = 2e-2  # bf16 keeps 8 bits of mantissa (eps 7.8e-3); fp32 runs on the CPU agree exactly
NOISE_FACTOR = 2.0       # ... or twice the single-GPU reference's own run-to-run difference, if that is larger


def make_model_dir(root: Path, tiny: bool) -> dict:
    """config.yaml + gpt.pth of a fresh UnifiedVoice (seed 0), the two files the training task reads."""
    from indextts_integration.tiny_checkpoint import TINY_GPT, write_gpt

    gpt = {**TINY_GPT, "number_text_tokens": 256} if tiny else dict(FULL_GPT)
    cfg = {"gpt": gpt, "gpt_checkpoint": "gpt.pth"}
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "config.yaml").is_file():  # written last: its presence marks a finished folder
        torch.manual_seed(0)
        write_gpt(root, cfg)
        (root / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return gpt


def write_manifest(root: Path, gpt: dict, n: int, seed: int = 0) -> Path:
    """n examples in scripts/prepare_dataset.py's layout: features/<id>.pt + one JSONL line each."""
    g = torch.Generator().manual_seed(seed)
    feats = root / "features"
    feats.mkdir(parents=True, exist_ok=True)
    D, lines = gpt["model_dim"], []
    for i in range(n):
        n_text = int(torch.randint(90, 111, (), generator=g))
        n_codes = int(torch.randint(450, 521, (), generator=g))
        name = f"ex{i:05d}"
        torch.save({"codes": torch.randint(0, 8192, (n_codes,), generator=g).to(torch.int16),
                    "cond_latent": torch.randn(32, D, generator=g) * 0.1,
                    "emo_vec": torch.randn(D, generator=g) * 0.1}, feats / f"{name}.pt")
        ids = torch.randint(2, gpt["number_text_tokens"], (n_text,), generator=g).tolist()
        lines.append({"id": name, "text_ids": ids, "features": f"features/{name}.pt",
                      "prompt_features": f"features/{name}.pt", "n_codes": n_codes})
    manifest = root / "train_manifest.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return manifest


def run_training(args, n_proc: int, out: Path, model_dir: Path, manifest: Path, grad_accum: int = 1) -> list[dict]:
    """One `torchrun ... scripts/train.py` run; returns its metrics.jsonl records."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n_proc}",
           str(ROOT / "scripts" / "train.py"), "--model-dir", str(model_dir), "--train-manifest", str(manifest),
           "--output-dir", str(out), "--batch-size", str(args.batch_size), "--grad-accum", str(grad_accum),
           "--max-steps", str(args.steps), "--lora-rank", "8", "--lora-alpha", "16", "--amp", args.amp,
           "--device", args.device, "--save-every", "0", "--eval-every", "0", "--log-every", "1",
           "--no-tensorboard", "--no-plot", "--no-progress", "--seed", "1234", "--base-dtype", args.base_dtype]
    if args.checkpointing:
        cmd += ["--task-option", "gradient_checkpointing=true"]
    for option in args.task_option:
        cmd += ["--task-option", option]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **dict(args.env), **NCCL_SAFETY}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (args.uv_site, str(ROOT), os.environ.get("PYTHONPATH")) if p)
    print(f"[ddp] {n_proc} process(es), batch {args.batch_size} x accumulation {grad_accum}, {args.steps} steps",
          file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode:
        raise RuntimeError(f"torchrun with {n_proc} process(es) failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    from lora_engine.training.metrics import read_metrics

    return read_metrics(out / "metrics.jsonl")


def summarize(records: list[dict], n_proc: int, batch: int, warmup: int) -> dict:
    all_times = [r["step_time_s"] for r in records if "step_time_s" in r]
    times = all_times[warmup:]
    if not times:
        raise ValueError(f"no timed steps after {warmup} warm-up steps: raise --steps")
    step_ms = 1e3 * statistics.median(times)
    peaks = next((r["peak_memory_gb_per_rank"] for r in records if "peak_memory_gb_per_rank" in r), None)
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"gpus": n_proc, "per_gpu_batch": batch, "global_batch": n_proc * batch, "timed_steps": len(times),
            "step_time_ms": step_ms, "step_time_ms_q1": 1e3 * q[0], "step_time_ms_q3": 1e3 * q[2],
            "samples_per_s": n_proc * batch / (step_ms / 1e3), "peak_memory_gb_per_gpu": peaks,
            "step_times_ms": [round(1e3 * t, 2) for t in all_times]}


def compare_adapters(a_path: Path, b_path: Path) -> dict:
    """Worst per-tensor relative difference ||a - b|| / ||b|| over the LoRA tensors of two adapter files."""
    from safetensors.torch import load_file

    a, b = load_file(str(a_path)), load_file(str(b_path))
    if a.keys() != b.keys():
        raise ValueError(f"{a_path} and {b_path} hold different tensors")
    rel = {k: float((a[k].double() - b[k].double()).norm() / b[k].double().norm().clamp_min(1e-30)) for k in b}
    name = max(sorted(rel), key=rel.get)
    return {"worst_rel_diff": rel[name], "worst_tensor": name, "tensors": len(b)}


def equivalence(args, counts: list[int], records: dict, work: Path, model_dir: Path, manifest: Path) -> dict:
    """N_max processes against one with accumulation N_max (same global batches), and that one against itself."""
    top = counts[-1]
    accum = run_training(args, 1, work / f"run-1x{top}", model_dir, manifest, grad_accum=top)
    reference = work / f"run-1x{top}" / "adapter.safetensors"
    eq = compare_adapters(work / f"run-{top}" / "adapter.safetensors", reference)
    # The reference's own run-to-run spread (bf16 kernels that add in a varying order, amplified by Adam's
    # normalisation of tiny gradients): N GPUs cannot be asked to agree with it more closely than it repeats.
    run_training(args, 1, work / f"run-1x{top}-again", model_dir, manifest, grad_accum=top)
    eq["reference_repeat_rel_diff"] = compare_adapters(work / f"run-1x{top}-again" / "adapter.safetensors",
                                                       reference)["worst_rel_diff"]
    losses = {r["step"]: r["loss"] for r in accum if "loss" in r and "step_time_s" in r}
    eq.update(gpus=top, per_gpu_batch=args.batch_size, steps=args.steps, rtol=EQUIVALENCE_RTOL,
              max_loss_diff=max(abs(r["loss"] - losses[r["step"]]) for r in records[top] if "step_time_s" in r))
    # The comparison's resolution: one GPU with a smaller global batch must come out visibly different.
    eq["one_gpu_half_batch_rel_diff"] = compare_adapters(work / f"run-{counts[0]}" / "adapter.safetensors",
                                                         reference)["worst_rel_diff"] if counts[0] == 1 else None
    eq["tolerance"] = max(EQUIVALENCE_RTOL, NOISE_FACTOR * eq["reference_repeat_rel_diff"])
    eq["passed"] = eq["worst_rel_diff"] <= eq["tolerance"]
    return eq


def markdown(res: dict) -> str:
    lines = [f"# Data-parallel LoRA training of UnifiedVoice, r8 ({res['gpu']}, {res['date']})", "",
             f"`{res['command']}`", "", res["setup"], "",
             "| GPUs | global batch | step time (ms, median [q1, q3]) | samples/s | scaling efficiency | "
             "peak memory per GPU (GB) |", "|---|---|---|---|---|---|"]
    for r in res["runs"]:
        peaks = ", ".join(f"{p:.2f}" for p in r["peak_memory_gb_per_gpu"] or []) or "n/a (CPU)"
        lines.append(f"| {r['gpus']} | {r['global_batch']} | {r['step_time_ms']:.1f} [{r['step_time_ms_q1']:.1f}, "
                     f"{r['step_time_ms_q3']:.1f}] | {r['samples_per_s']:.1f} | {r['scaling_efficiency']:.1%} | "
                     f"{peaks} |")
    eq = res["equivalence"]
    if eq is None:
        return "\n".join(lines) + "\n"
    lines += ["", f"Equivalence: {eq['gpus']} GPUs x batch {eq['per_gpu_batch']} against 1 GPU x batch "
                  f"{eq['per_gpu_batch']} x accumulation {eq['gpus']}, after {eq['steps']} steps: worst tensor "
                  f"relative difference {eq['worst_rel_diff']:.2e} ({eq['worst_tensor']}), losses differ by at most "
                  f"{eq['max_loss_diff']:.2e}. The reference run repeated ends "
                  f"{eq['reference_repeat_rel_diff']:.2e} from "
                  f"itself; tolerance max({eq['rtol']:g}, {NOISE_FACTOR:g} x that) = {eq['tolerance']:.2e}: "
                  f"**{'pass' if eq['passed'] else 'FAIL'}**."]
    if eq.get("one_gpu_half_batch_rel_diff") is not None:
        lines += ["", f"For scale: 1 GPU at batch {eq['per_gpu_batch']} without accumulation (half the global batch) "
                      f"ends {eq['one_gpu_half_batch_rel_diff']:.2e} away from the same reference."]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = res["runs"]
    n = [r["gpus"] for r in runs]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar([str(k) for k in n], [r["samples_per_s"] for r in runs], color="tab:blue", label="measured")
    ax.plot([str(k) for k in n], [k * runs[0]["samples_per_s"] / runs[0]["gpus"] for k in n], "k--o", label="linear")
    for i, r in enumerate(runs):
        ax.annotate(f"{r['scaling_efficiency']:.0%}", (i, r["samples_per_s"]), ha="center", va="bottom")
    ax.set_xlabel("GPUs (torchrun processes)")
    ax.set_ylabel("samples / s")
    ax.set_title("UnifiedVoice LoRA r8 training, data parallel")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def describe(args) -> str:
    """The run's setup in one sentence, for the report."""
    parts = [f"UnifiedVoice {'tiny' if args.tiny else 'full size'} (upstream class, random weights)",
             "LoRA r8 alpha 16 on the GPT's c_attn/c_proj/c_fc/c_proj",
             "bf16 autocast" if args.amp == "bf16" else "fp32",
             f"base stored in {'bf16' if args.base_dtype == 'bf16' else 'fp32'}",
             "AdamW (fused)" if args.device == "cuda" else "AdamW",
             f"batch {args.batch_size} per GPU of 90-110 text + 450-520 mel tokens",
             f"gradient checkpointing {'on' if args.checkpointing else 'off'}",
             "the task's other defaults (batches padded to a multiple of 64 on GPUs)",
             *args.task_option, *(f"{k}={v}" for k, v in args.env),
             f"{args.steps} steps per run, the first {args.warmup} untimed", "NCCL_NVLS_ENABLE=0"]
    return ", ".join(parts) + "."


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 2], help="process counts to run, one per GPU")
    ap.add_argument("--batch-size", type=int, default=4, help="examples per GPU per step (fixed across N)")
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=8, help="first steps left out of the timing")
    ap.add_argument("--examples", type=int, default=512, help="synthetic training examples")
    ap.add_argument("--checkpointing", action="store_true", help="train with gradient_checkpointing=true")
    ap.add_argument("--no-equivalence", action="store_true", help="time only: skip the two reference runs")
    ap.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                    help="an IndexTTS2 task option for scripts/train.py (e.g. pad_to_multiple=0)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--amp", default="bf16", choices=["bf16", "none"])
    ap.add_argument("--base-dtype", default="auto", choices=["auto", "bf16"],
                    help="scripts/train.py's --base-dtype: auto keeps gpt.pth's fp32, bf16 halves the frozen base")
    ap.add_argument("--tiny", action="store_true", help="a tiny UnifiedVoice (CPU smoke test; numbers mean nothing)")
    ap.add_argument("--work", help="folder that keeps the model dir and the data between calls (default: a "
                                   "temporary folder); the runs always go to a temporary folder")
    ap.add_argument("--uv-site", default=os.environ.get("UV_SITE"), help="PYTHONPATH entry with indextts + "
                                                                        "transformers 4.52")
    ap.add_argument("--env", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                    help="an environment variable for the training processes (e.g. PYTORCH_CUDA_ALLOC_CONF=...)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds allowed per torchrun run")
    ap.add_argument("--out", required=True, help="output stem: writes OUT.json, OUT.md, OUT.png")
    args = ap.parse_args(argv)
    counts = sorted(set(args.gpus))
    if args.device == "cuda" and counts[-1] > torch.cuda.device_count():
        raise SystemExit(f"--gpus {counts[-1]} asked for, this machine has {torch.cuda.device_count()} GPU(s)")
    if args.warmup >= args.steps:
        raise SystemExit(f"--warmup {args.warmup} must be below --steps {args.steps}")

    with tempfile.TemporaryDirectory() as tmp:
        inputs, work = Path(args.work or tmp), Path(tmp)  # the model dir and data may be kept; the runs are not
        model_dir = inputs / ("model-tiny" if args.tiny else "model")
        gpt = make_model_dir(model_dir, args.tiny)
        manifest = write_manifest(inputs / ("data-tiny" if args.tiny else "data"), gpt, args.examples)
        runs, records = [], {}
        for n in counts:
            records[n] = run_training(args, n, work / f"run-{n}", model_dir, manifest)
            runs.append(summarize(records[n], n, args.batch_size, args.warmup))
        base = runs[0]["samples_per_s"] / runs[0]["gpus"]
        for r in runs:
            r["scaling_efficiency"] = r["samples_per_s"] / (r["gpus"] * base)
        eq = None if args.no_equivalence else equivalence(args, counts, records, work, model_dir, manifest)

    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    res = {"gpu": gpu, "date": datetime.date.today().isoformat(), "command": "python " + " ".join(
               [str(Path(__file__).relative_to(ROOT))] + (argv if argv is not None else sys.argv[1:])),
           "setup": describe(args),
           "torch": torch.__version__, "nccl_env": NCCL_SAFETY, "env": dict(args.env), "runs": runs,
           "equivalence": eq}
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(res))
    plot(res, stem.with_suffix(".png"))
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
