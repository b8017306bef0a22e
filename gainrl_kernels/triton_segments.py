"""Triton helpers shared by the segment-aware kernels (fused RMSNorm + angle, pairwise)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def segment_ids(pos, off_row_ptr, length, K: tl.constexpr):
    """Segment of each position (k with o_k <= pos < o_{k+1}), or -1 outside [o_0, o_K) / past the sequence."""
    cnt = tl.zeros_like(pos)
    for k in tl.static_range(K + 1):
        o = tl.load(off_row_ptr + k)
        o = tl.minimum(tl.maximum(o, 0), length)
        cnt += (pos >= o).to(tl.int32)
    return tl.where((cnt >= 1) & (cnt <= K) & (pos >= 0) & (pos < length), cnt - 1, -1)
