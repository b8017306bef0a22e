"""Loops of disassembled SASS (nvdisasm -c): the parser bench/fused_static.py and cuda_rows_static.py share. No
side effects on import (bench/fused_static.py clears TRITON_INTERPRET)."""
from __future__ import annotations

import re
from typing import Optional


def _instructions(sass: str) -> tuple[list[tuple[int, str]], dict[str, int]]:
    """([(address, instruction)], {label: address}) of disassembled ``sass``."""
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
    return ins, labels


def _branches(ins: list[tuple[int, str]], labels: dict[str, int]) -> list[tuple[int, int, bool]]:
    """(address, target address, conditional) of every branch to a label."""
    return [(a, labels[m.group(2)], bool(m.group(1))) for a, text in ins
            if (m := re.search(r"^(@!?U?P\w+\s+)?BRA\s+`\((\.L_x_\d+)\)", text)) and m.group(2) in labels]


def _loop_spans(ins: list[tuple[int, str]], labels: dict[str, int]) -> list[tuple[int, int]]:
    return [(target, a) for a, target, _ in _branches(ins, labels) if target < a]


def sass_loops(sass: str) -> list[list[str]]:
    """The loops of disassembled ``sass``: for each backward branch, the instructions from its target to it."""
    ins, labels = _instructions(sass)
    return [[t for a, t in ins if lo <= a <= hi] for lo, hi in _loop_spans(ins, labels)]


def sass_hot_loop_instructions(sass: Optional[str], cold: int = 100) -> Optional[int]:
    """Machine instructions of the main loop (the longest) that a step runs when it takes none of the loop's long
    forward jumps: the loop less every outermost region of at least ``cold`` instructions that a conditional
    forward branch inside it skips (in the CUDA rows kernel's SPANS form: the cursor's advance and a piece's
    flush, run at a change of sequence or segment only). None without SASS or loops."""
    if sass is None:
        return None
    ins, labels = _instructions(sass)
    spans = _loop_spans(ins, labels)
    if not spans:
        return None
    lo, hi = max(spans, key=lambda span: sum(1 for a, _ in ins if span[0] <= a <= span[1]))
    count = lambda a0, a1: sum(1 for a, _ in ins if a0 <= a < a1)  # noqa: E731
    skipped, end = 0, -1
    for a, target, conditional in sorted(_branches(ins, labels)):
        if conditional and lo <= a and a < target <= hi and a >= end and count(a + 1, target) >= cold:
            skipped += count(a + 1, target)
            end = target  # regions nested in this one are inside it
    return count(lo, hi + 1) - skipped


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
