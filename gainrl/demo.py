"""`gainrl demo`: the angle ops on a packed random batch shaped like real hidden states, with metrics and timings."""
from __future__ import annotations

import time

import torch

from gainrl_kernels import angle_concentration, angle_stats
from gainrl_kernels.naive import released_causal_angle


def run_demo(batch: int = 8, length: int = 2048, dim: int = 896, seed: int = 0) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=device).manual_seed(seed)
    lens = torch.randint(length // 2, length + 1, (batch,), generator=g, device=device)
    cu = torch.zeros(batch + 1, dtype=torch.int32, device=device)
    cu[1:] = lens.cumsum(0)
    n_tokens = int(cu[-1])
    base = torch.randn(dim, generator=g, device=device)
    hidden = (base + 1.5 * torch.randn(n_tokens, dim, generator=g, device=device)).to(torch.bfloat16)
    # K = 2 segments per sequence: a "prefix" (first third) and a "question" (the rest)
    seg = torch.stack([torch.zeros_like(lens), lens // 3, lens], 1).to(torch.int32)
    print(f"packed batch: B={batch}, T={n_tokens}, D={dim}, bf16 on {device}")
    stats = angle_stats(hidden, cu, seg)
    t0 = time.perf_counter()
    stats = angle_stats(hidden, cu, seg)
    conc = angle_concentration(stats)
    if device == "cuda":
        torch.cuda.synchronize()
    ours = time.perf_counter() - t0
    print(f"{'seq':>4} {'tokens':>7} {'C_intra(Q)':>11} {'C_inter(Q,P)':>13} {'score':>8} {'C_causal':>9} {'C_causal_ref':>13}")
    for b in range(batch):
        print(
            f"{b:4d} {int(lens[b]):7d} {conc.intra[b, 1]:11.5f} {conc.inter[b, 1, 0]:13.5f} {conc.score[b]:8.5f} "
            f"{conc.causal[b]:9.5f} {conc.causal_ref[b]:13.5f}"
        )
    t0 = time.perf_counter()
    released = released_causal_angle(hidden[: int(cu[2])], cu[:3])
    per_seq = (time.perf_counter() - t0) / 2
    print(f"\ngainrl angle_stats + angle_concentration, whole batch: {ours * 1e3:.2f} ms")
    print(f"released per-sequence L x L way: {per_seq * 1e3:.1f} ms per sequence (2 timed) "
          f"-> ~{per_seq * batch * 1e3:.0f} ms for the batch, {per_seq * batch / ours:.0f}x slower")
    print(f"C_causal_ref check on sequence 0: released {released[0]:.5f} vs ours {float(conc.causal_ref[0]):.5f} (bf16 matmul)")
