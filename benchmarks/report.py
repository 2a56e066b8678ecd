"""Printing and saving a benchmark's flat report, shared by the small benchmark scripts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


def emit(report: dict, out: Optional[Path], filename: str) -> None:
    """Print ``report`` one key a line; write it as JSON to ``out/filename`` when ``out`` is given."""
    for key, value in report.items():
        print(f"{key:>22}: {value}")
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / filename).write_text(json.dumps(report, indent=2))
