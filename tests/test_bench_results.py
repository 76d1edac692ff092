"""Benchmark results are shared files: none may name a folder of the machine that produced them (the checkout, a
temporary folder, a home directory)."""

from __future__ import annotations

import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"
ABSOLUTE = re.compile(r"(?<![\w.])/(?:work|tmp|home|root|Users|var/folders|private)/[\w.-]+")


def test_results_name_no_machine_paths():
    bad = []
    for f in sorted(RESULTS.rglob("*")):
        if f.is_file() and f.suffix in (".txt", ".md", ".json", ".csv"):
            bad += [f"{f.name}: {m.group(0)}" for m in ABSOLUTE.finditer(f.read_text(errors="replace"))]
    assert not bad, bad
