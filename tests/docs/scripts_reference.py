"""docs/scripts.md quotes each script's --help verbatim; this module produces and checks those blocks.

Each `<!-- help: scripts/NAME.py -->` marker in the page is followed by a ```text block holding the output of
`python scripts/NAME.py --help` (COLUMNS=100). After changing a script's flags, regenerate the blocks:

    python -m tests.docs.scripts_reference --write
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PAGE = REPO / "docs" / "scripts.md"
MARKER = re.compile(r"(<!-- help: (scripts/[\w.]+) -->\n```text\n)(.*?)(^```$)", flags=re.S | re.M)


def python_scripts() -> list[str]:
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "scripts").glob("*.py"))


def help_text(script: str) -> str:
    env = {**os.environ, "COLUMNS": "100", "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, script, "--help"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    return out.rstrip() + "\n"


def quoted_help(markdown: str) -> dict[str, str]:
    return {m.group(2): m.group(3) for m in MARKER.finditer(markdown)}


def regenerate(markdown: str) -> str:
    return MARKER.sub(lambda m: m.group(1) + help_text(m.group(2)) + m.group(4), markdown)


if __name__ == "__main__":
    if "--write" in sys.argv:
        PAGE.write_text(regenerate(PAGE.read_text()))
        print(f"updated {PAGE}")
    else:
        stale = [s for s, text in quoted_help(PAGE.read_text()).items() if text != help_text(s)]
        print("\n".join(stale) or "up to date")
