"""Targets, and the markdown table + bar chart written next to the results JSON."""
from __future__ import annotations

from pathlib import Path

# key: (target, how it is met); lower is better everywhere.
TARGETS = {
    "train_eager_r8_vs_frozen_floor": 1.10, "train_eager_r16_vs_frozen_floor": 1.12, "train_eager_r8_vs_peft": 0.70,
    "train_compiled_r8_vs_peft_compiled": 0.85, "train_peak_mem_r8_vs_peft": 0.80, "decode_unmerged_vs_base": 1.10,
    "decode_blend4_vs_base": 1.15, "decode_unmerged_vs_base_graphed": 1.10, "decode_blend4_vs_base_graphed": 1.15,
    "prefill_mixed_batch_vs_base": 1.50, "merge_ms": 2.0, "unmerge_ms": 2.0, "blend4_merge_ms": 5.0,
    "restore_bits_changed_after_1000": 0, "unifiedvoice_train_peak_gb": 6.0,
}


def verdict(key: str, value) -> str:
    if key not in TARGETS or value is None:
        return "—"
    return "met" if value <= TARGETS[key] else "NOT met"


def _raw(entry: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items() if k != "value")


def markdown(res: dict) -> str:
    lines = [f"# Benchmarks on {res['gpu']} ({res['date']})", "",
             f"torch {res['versions'].get('torch')}, transformers {res['versions'].get('transformers')}, "
             f"peft {res['versions'].get('peft')}, triton {res['versions'].get('triton')}. "
             f"Command: `{res['command']}`", "",
             *([f"Rows from more than one run: {'; '.join(f'{k}: {v}' for k, v in res['sources'].items())}.", ""]
               if res.get("sources") else []),
             "| key | value | target | verdict | raw |", "|---|---|---|---|---|"]
    for key, entry in res["ratios"].items():
        v = entry.get("value")
        vs = f"{v:.3f}" if isinstance(v, float) else str(v)
        tgt = TARGETS.get(key, "")
        lines.append(f"| {key} | {vs} | {'≤ ' + str(tgt) if tgt != '' else ''} | {verdict(key, v)} | {_raw(entry)} |")
    if res.get("errors"):
        lines += ["", "Errors:", ""] + [f"- {k}: {v}" for k, v in res["errors"].items()]
    return "\n".join(lines) + "\n"


def bar_chart(res: dict, path: Path) -> None:
    """Each key's value over its target (1.0 = exactly on target; below the line is met)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k, e in res["ratios"].items() if k in TARGETS and TARGETS[k] and isinstance(e.get("value"), (int, float))]
    vals = [res["ratios"][k]["value"] / TARGETS[k] for k in keys]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(keys) + 1.5))
    ax.barh(keys, vals, color=["tab:green" if v <= 1 else "tab:red" for v in vals])
    ax.axvline(1.0, color="black", lw=1)
    ax.set_xlabel("value / target (≤ 1 is met)")
    ax.set_title(f"LoRA engine vs targets — {res['gpu']} {res['date']}")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
