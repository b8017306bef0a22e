"""Reading the run logs (``metrics.jsonl``, ``eval.jsonl``, ``epochs.jsonl``, ``scores.jsonl``)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a JSONL log; ``[]`` when the file does not exist. A line that does not parse (a torn last line, from a
    crash mid-write) is ignored."""
    p = Path(path)
    if not p.is_file():
        return []
    rows = []
    for line in p.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


__all__ = ["read_jsonl"]
