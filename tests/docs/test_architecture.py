"""The merge-memory figures docs/architecture.md quotes are what the engine holds today (bf16 row re-measured)."""
import re

import torch

from tests.docs.merge_memory import measure
from tests.docs.error_messages import REPO

PAGE = REPO / "docs" / "architecture.md"


def test_bf16_merge_memory_row_matches_a_fresh_measurement():
    text = PAGE.read_text()
    row = re.search(r"^\| bfloat16 \| (.*) \|$", text, flags=re.M).group(1).split(" | ")
    m = measure(torch.bfloat16)
    assert row[0] == f"{m['weight_bytes'] / 2**20:.1f} MiB"
    assert row[1] == f"{m['held_bytes'] / 2**20:.2f} MiB ({m['held_bytes'] / m['weight_bytes']:.3f}x)"
    assert row[2] == f"{m['correction_bytes'] / 2**20:.2f} MiB"
    assert row[3] == f"{m['stacked_bytes'] / 2**10:.0f} KiB"
    assert row[4] == str(m["overflow_elements"])
    # The exactness is paid with 1 byte per merged element, not a 2-byte snapshot.
    assert m["correction_bytes"] == m["weight_elements"] and m["held_bytes"] < 0.55 * m["weight_bytes"]
    whole_gpt = round(24 * m["held_bytes"] / 2**20)
    assert f"about {whole_gpt} MiB" in text
