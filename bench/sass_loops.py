"""Loops of disassembled SASS (nvdisasm -c): the parser bench/fused_static.py and cuda_rows_static.py share. No
side effects on import (bench/fused_static.py clears TRITON_INTERPRET)."""
from __future__ import annotations

import re
from typing import Optional


def sass_loops(sass: str) -> list[list[str]]:
    """The loops of disassembled ``sass``: for each backward branch, the instructions from its target to it."""
    ins: list[tuple[int, str]] = []
    labels: dict[str, int] = {}
    pending: list[str] = []
    for line in sass.splitlines():
        if m := re.match(r"\s*(\.L_x_\d+):", line):
            pending.append(m.group(1))
        elif m := re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line):
            addr = int(m.group(1), 16)
            labels.update({label: addr for label in pending})
            pending = []
            ins.append((addr, m.group(2)))
    spans = [(labels[m.group(1)], addr) for addr, text in ins
             if (m := re.search(r"BRA\s+`\((\.L_x_\d+)\)", text)) and labels.get(m.group(1), addr) < addr]
    return [[t for a, t in ins if lo <= a <= hi] for lo, hi in spans]


def sass_loop_instructions(sass: Optional[str]) -> Optional[int]:
    """Machine instructions (per thread) in the main loop of disassembled ``sass``: the loop (backward branch) with
    the most instructions (in the fused kernel the one-row loop of segment chunks, longer than the loop over rows
    in no segment). None without SASS (no nvdisasm)."""
    loops = sass_loops(sass) if sass is not None else []
    return max(map(len, loops)) if loops else None


def kernel_sass(sass: str, mangled: str) -> str:
    """The part of a whole cubin's disassembly ``sass`` that is kernel ``mangled``'s code."""
    part = sass.split(f".text.{mangled}:", 1)[1]
    return re.split(r"\n\s*\.text\.\S+:", part, maxsplit=1)[0]
