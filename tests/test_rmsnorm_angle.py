"""Fused RMSNorm + angle statistics: forward, statistics, gradients, padded batches, module, validation.

Runs on CPU tensors through the Triton interpreter (TRITON_INTERPRET=1, set before triton is imported).
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from gainrl_kernels.naive_rmsnorm_angle import (  # noqa: E402
    angle_stats_reference,
    cosine_block_sums,
    packed_rows,
    rmsnorm_reference,
)
from gainrl_kernels import rmsnorm_angle as rmsnorm_module  # noqa: E402
from gainrl_kernels import rmsnorm_angle_backward as backward_module  # noqa: E402
from gainrl_kernels import rmsnorm_angle_forward_kernels as kernels_module  # noqa: E402
from rmsnorm_inputs import assert_stats_close, concentrated, random_ragged, ulp_tol  # noqa: E402
from triton_env import needs_triton, triton_device  # noqa: E402
from gainrl_kernels.rmsnorm_angle import FusedRMSNormAngle, padded_to_cu_seqlens, rmsnorm_angle  # noqa: E402

pytestmark = needs_triton

DEV = triton_device()
EPS = 1e-6
DIM = 40  # not a power of two: exercises the D masks
LENS = [5, 0, 1, 41, 23]  # ragged, with an empty and a length-1 sequence
# offsets: o_0 > 0, o_K < len, empty segments, an empty sequence, a length-1 sequence
SEG = [[0, 1, 3, 5], [0, 0, 0, 0], [0, 0, 1, 1], [2, 9, 30, 40], [0, 10, 10, 23]]


def cu_of(lens: list[int], device: str = DEV) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)


def weight_of(dim: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (1.0 + 0.2 * torch.randn(dim, generator=g)).to(DEV, dtype)


@pytest.fixture(autouse=True)
def triton_rows(monkeypatch) -> None:
    """The Triton rows kernel on GPUs too: where the extension has the CUDA rows kernel it takes 16-bit rows by
    default; tests/test_rmsnorm_angle_cuda.py checks that one."""
    monkeypatch.setattr(rmsnorm_module, "_CUDA_ROWS", False)


@pytest.fixture(params=["one_row", "row_tiles", "sliced"])
def fwd_kernel(request, monkeypatch) -> str:
    """Run a forward test with each forward path: whole rows in registers one row per step (the default from
    BLOCK_D = 1024 on: previous row kept, next prefetched), whole rows in 2-row steps (narrow rows; a chunk takes
    several steps and its last one may be partly masked), the column-sliced kernel (D > 4096) forced at small D
    with 8-row chunks and 16-wide slices. Other test files run the default tiles."""
    if request.param == "one_row":
        monkeypatch.setattr(rmsnorm_module, "_ROWS_ONE_ROW_MIN_D", 16)
    elif request.param == "row_tiles":
        monkeypatch.setattr(rmsnorm_module, "_ROWS_TILE", 128)
    else:
        monkeypatch.setattr(rmsnorm_module, "_ROWS_MAX_BLOCK_D", 0)
        monkeypatch.setattr(rmsnorm_module, "_SLICED_TILE", (8, 16, 4))
    cfg = rmsnorm_module._fwd_config(64, DIM, 2, torch.device(DEV), stats=True)
    assert cfg.rows == (request.param != "sliced") and (cfg.block_t == 1) == (request.param == "one_row")
    return request.param


@pytest.fixture(scope="module")
def packed() -> dict:
    cu = cu_of(LENS)
    rows = int(cu[-1]) + 3  # 3 trailing rows in no sequence: normalised, not counted
    return {"x": concentrated((rows,), DIM).to(DEV), "cu": cu, "off": torch.tensor(SEG, dtype=torch.int32, device=DEV)}


def test_input_generator_is_concentrated(packed):
    u = torch.nn.functional.normalize(packed["x"].double(), dim=-1)
    cos = u @ u.T
    n = cos.shape[0]
    mean = (cos.sum() - n) / (n * (n - 1))
    assert 0.2 < float(mean) < 0.8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_and_stats(packed, dtype, fwd_kernel):
    x = packed["x"].to(dtype)
    w = weight_of(DIM, dtype)
    y, stats = rmsnorm_angle(x, w, EPS, packed["cu"], packed["off"])
    assert y.shape == x.shape and y.dtype == dtype
    y_ref = rmsnorm_reference(x, w, EPS)
    torch.testing.assert_close(y, y_ref, **ulp_tol(dtype))
    # statistics are those of y as the model sees it (the rounded output)
    ref = angle_stats_reference(y, packed["cu"], packed["off"])
    assert stats.unit_sum.shape == (5, 3, DIM) and stats.count.dtype == torch.int32
    assert_stats_close(stats, ref)
    # S_k . S_l against the explicit cosine matrix's block sums
    blocks = cosine_block_sums(y, packed["cu"], packed["off"])
    s = stats.unit_sum.double().cpu()
    torch.testing.assert_close(s @ s.transpose(1, 2), blocks, rtol=1e-5, atol=1e-4)


def test_default_segments_and_empty_batch(packed, fwd_kernel):
    x, cu = packed["x"], packed["cu"]
    w = weight_of(DIM, torch.float32)
    y, stats = rmsnorm_angle(x, w, EPS, cu)
    assert stats.unit_sum.shape == (5, 1, DIM)
    assert stats.count[:, 0].tolist() == LENS
    assert_stats_close(stats, angle_stats_reference(y, cu))
    # no sequences: plain RMSNorm, empty statistics
    y0, s0 = rmsnorm_angle(x, w, EPS, torch.zeros(1, dtype=torch.int32, device=DEV))
    torch.testing.assert_close(y0, y, rtol=0, atol=0)
    assert s0.unit_sum.shape == (0, 1, DIM) and s0.adjacent.shape == (0,)
    # no segment info at all
    y1, s1 = rmsnorm_angle(x, w, EPS)
    assert s1 is None
    torch.testing.assert_close(y1, y, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_joint_row_sums(packed, dtype, monkeypatch):
    """The compiled one-row path sums ||y_t||², y_t . y_{t-1} and the next row's x² in one stacked reduction
    (``_row_sums3``); the interpreter runs it here only on request, as its order differs from ``tl.sum``'s."""
    monkeypatch.setattr(rmsnorm_module, "_ROWS_ONE_ROW_MIN_D", 16)
    x = packed["x"].to(dtype)
    w = weight_of(DIM, dtype)
    y_sep, s_sep = rmsnorm_angle(x, w, EPS, packed["cu"], packed["off"])
    monkeypatch.setattr(rmsnorm_module, "_JOINT_SUMS", True)
    y, stats = rmsnorm_angle(x, w, EPS, packed["cu"], packed["off"])
    torch.testing.assert_close(y, y_sep, **ulp_tol(dtype))  # rstd may move by an ulp
    assert_stats_close(stats, angle_stats_reference(y, packed["cu"], packed["off"]))
    for a, b in zip(stats, s_sep):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inverse_norm_forms(packed, fwd_kernel, dtype, monkeypatch):
    """1 / ||y_t|| of the statistics: the hardware rsqrt (compiled default) and the IEEE square root and division
    (interpreter default) give the same y, bitwise, and statistics within fp32 rounding of each other and of the
    float64 reference, on every forward path."""
    x = packed["x"].to(dtype)
    w = weight_of(DIM, dtype)
    out = {}
    for rsqrt in (False, True):
        monkeypatch.setattr(rmsnorm_module, "_RSQRT_INV", rsqrt)
        out[rsqrt] = rmsnorm_angle(x, w, EPS, packed["cu"], packed["off"])
        assert_stats_close(out[rsqrt][1], angle_stats_reference(out[rsqrt][0], packed["cu"], packed["off"]))
    assert torch.equal(out[False][0], out[True][0])
    for a, b in zip(out[False][1], out[True][1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rstd_forms(packed, fwd_kernel, dtype, monkeypatch):
    """rstd = rsqrt(sum(x²) / D + eps) by the hardware rsqrt (compiled default, as torch.rsqrt on CUDA) and by the
    IEEE square root and reciprocal (interpreter default): y within one rounding step of the reference and of each
    other and bitwise the bare kernel's, the statistics those of each y, the gradients through the saved rstd those
    of the reference."""
    x = packed["x"].to(dtype).requires_grad_(True)
    w = weight_of(DIM, dtype).requires_grad_(True)
    dy = concentrated((x.shape[0],), DIM, seed=5).to(DEV, dtype)
    y_ref = rmsnorm_reference(x, w, EPS)
    gx_ref, gw_ref = torch.autograd.grad(y_ref, (x, w), dy)
    out = {}
    for rsqrt in (False, True):
        monkeypatch.setattr(rmsnorm_module, "_RSQRT_RSTD", rsqrt)
        y, stats = rmsnorm_angle(x, w, EPS, packed["cu"], packed["off"])
        torch.testing.assert_close(y, y_ref, **ulp_tol(dtype))
        assert_stats_close(stats, angle_stats_reference(y.detach(), packed["cu"], packed["off"]))
        assert torch.equal(y, rmsnorm_angle(x, w, EPS)[0])  # the bare kernel, same form
        gx, gw = torch.autograd.grad(y, (x, w), dy)
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(gx, gx_ref, **tol)
        torch.testing.assert_close(gw.float(), gw_ref.float(), rtol=tol["rtol"],
                                   atol=tol["atol"] * float(gw_ref.abs().max()))
        out[rsqrt] = y
    torch.testing.assert_close(out[True], out[False], **ulp_tol(dtype))


def test_register_cap(monkeypatch):
    """A register cap on the one-row steps with statistics (``_ROWS_STATS_REGISTER_CAP``: warps and ptxas .maxnreg
    per (compute capability, BLOCK_D, element size); the interpreter ignores the cap) leaves every output as it was.
    It applies only where the launch compiles vector loads (``_vector_aligned``): 16-byte aligned x and weight, D
    and the row stride divisible by 16."""
    monkeypatch.setattr(rmsnorm_module, "_ROWS_ONE_ROW_MIN_D", 16)
    dim, lens = 64, [3, 17, 1, 9]
    x = concentrated((sum(lens) + 1,), dim, seed=5).to(DEV, torch.bfloat16)
    w = weight_of(dim, torch.bfloat16)
    cu = cu_of(lens)
    off = torch.tensor([[0, 1, 3], [2, 9, 17], [0, 0, 1], [0, 4, 9]], dtype=torch.int32, device=DEV)
    y0, s0 = rmsnorm_angle(x, w, EPS, cu, off)
    cc = kernels_module._capability_major(x.device)
    monkeypatch.setattr(rmsnorm_module, "_ROWS_STATS_REGISTER_CAP", {(cc, dim, 2): (4, 168)})
    cfg = rmsnorm_module._stats_plan(x, cu, off, None, w).cfg
    assert (cfg.num_warps, cfg.maxnreg) == (4, 168)
    assert rmsnorm_module._plain_plan(x).cfg.maxnreg is None  # the bare kernel: never capped
    y1, s1 = rmsnorm_angle(x, w, EPS, cu, off)
    assert torch.equal(y0, y1)
    for a, b in zip(s0, s1):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # no cap: another compute capability or element size, or a launch with scalar loads
    assert rmsnorm_module._fwd_config(64, dim, 2, x.device, True, capability=cc + 1).maxnreg is None
    assert rmsnorm_module._fwd_config(64, dim, 4, x.device, True).maxnreg is None
    flat = torch.cat([x.new_zeros(1), x.flatten()])
    shifted = flat[1:].view_as(x)  # 2 bytes past a 16-byte boundary
    strided = torch.cat([x, x[:, :8]], dim=1)[:, :dim]  # row stride 72
    for xv, wv in ((shifted, w), (strided, w), (x, torch.cat([w.new_zeros(1), w])[1:])):
        assert not kernels_module._vector_aligned(xv, wv)
        assert rmsnorm_module._stats_plan(xv, cu, off, None, wv).cfg.maxnreg is None
        y2, s2 = rmsnorm_angle(xv, wv, EPS, cu, off)
        # compiled scalar loads may contract to FMAs differently: one rounding step of slack
        torch.testing.assert_close(y2, y0, **ulp_tol(torch.bfloat16))
        for a, b in zip(s2, s0):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def assert_matches_default(y, stats, y0, s0, x, w, cu, off) -> None:
    """A forward variant's y within a rounding step of the reference and of the default forward's y0, its
    statistics those of y and the default's s0 within fp32 rounding."""
    torch.testing.assert_close(y, rmsnorm_reference(x, w, EPS), **ulp_tol(x.dtype))
    torch.testing.assert_close(y, y0, **ulp_tol(x.dtype))
    assert_stats_close(stats, angle_stats_reference(y, cu, off))
    for a, b in zip(stats, s0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)


def ragged_rows(dim: int, dtype: torch.dtype, seed: int, strided: bool = True):
    """(x, w, cu_seqlens, seg_offsets) of a ragged batch for the one-row loop's options: 6 sequences (an empty and a
    length-1 one), K = 2 segments, 2 trailing rows in no sequence; ``strided``: x's row stride is dim + 8."""
    lens = [3, 17, 1, 0, 9, 2]
    x = concentrated((sum(lens) + 2,), dim, seed=seed).to(DEV, dtype)
    if strided:
        x = torch.cat([x, x[:, :8]], dim=1)[:, :dim]
    off = torch.tensor([[0, 1, 3], [2, 9, 17], [0, 0, 1], [0, 0, 0], [0, 4, 9], [0, 1, 2]], dtype=torch.int32,
                       device=DEV)
    return x, weight_of(dim, dtype), cu_of(lens), off


@pytest.mark.skipif(DEV != "cuda", reason="the prefetch is inline PTX: compiled code only (the interpreter skips it)")
@pytest.mark.parametrize("knobs", [dict(_PREFETCH_ROWS=1), dict(_PREFETCH_ROWS=2), dict(_PREFETCH_ROWS=4),
                                   dict(_PREFETCH_ROWS=2, _PREFETCH_L1=True), dict(_X_EVICTION="evict_first")],
                         ids=["ahead1", "ahead2", "ahead4", "ahead2_l1", "x_evict_first"])
def test_cache_hints_change_nothing(knobs, monkeypatch):
    """A prefetch of a row further ahead (``_PREFETCH_ROWS``, into the L2 or also the L1) and an eviction policy on
    x's loads are cache hints: y and the statistics stay bitwise the same, with chunks shorter than the prefetch
    distance (clamped to the rows a program reads), a ragged batch with empty and length-1 sequences, and a row
    stride that is not D."""
    monkeypatch.setattr(rmsnorm_module, "_ROWS_ONE_ROW_MIN_D", 16)
    x, w, cu, off = ragged_rows(96, torch.bfloat16, seed=6)  # row stride 104
    y0, s0 = rmsnorm_angle(x, w, EPS, cu, off)
    for name, value in knobs.items():
        monkeypatch.setattr(rmsnorm_module, name, value)
    y1, s1 = rmsnorm_angle(x, w, EPS, cu, off)
    assert torch.equal(y0, y1)
    for a, b in zip(s0, s1):
        assert torch.equal(a, b)


@pytest.mark.parametrize("stages", [2, 3])
def test_pipelined_row_loop(stages, monkeypatch):
    """The one-row loop that loads row t+1 where step t uses it (``_PIPELINE_STAGES``; compiled, Triton's pipeliner
    issues those loads ahead as cp.async into shared memory) gives y and the statistics of the default loop
    bitwise: ragged sequences, an empty and a length-1 one, chunks of one row and longer than the stages, a pair
    across a chunk's end, a row stride that is not D."""
    monkeypatch.setattr(rmsnorm_module, "_ROWS_ONE_ROW_MIN_D", 16)
    x, w, cu, off = ragged_rows(96, torch.bfloat16, seed=7)  # row stride 104
    monkeypatch.setattr(rmsnorm_module, "_MAX_CHUNK", 4)  # several chunks per segment: pairs across chunk ends
    y0, s0 = rmsnorm_angle(x, w, EPS, cu, off)
    monkeypatch.setattr(rmsnorm_module, "_PIPELINE_STAGES", stages)
    cfg = rmsnorm_module._fwd_config(64, 96, 2, torch.device(DEV), stats=True)
    assert rmsnorm_module._rows_tuning(cfg, DEV == "cuda")["PIPELINE"] == stages
    y1, s1 = rmsnorm_angle(x, w, EPS, cu, off)
    assert torch.equal(y0, y1)
    for a, b in zip(s0, s1):
        assert torch.equal(a, b)
    assert_stats_close(s1, angle_stats_reference(y1, cu, off))


@pytest.mark.parametrize("dim,dtype", [(40, torch.float32), (40, torch.bfloat16), (40, torch.float16),
                                       (48, torch.bfloat16)])
def test_split_tail_rows(dim, dtype, monkeypatch):
    """One-row steps over a row held as two tiles (``_ROWS_SPLIT_TAIL``, as D = 5120 is 4096 + 1024 columns): 40 as
    32 + 16 (the tail partly masked) and 48 as 32 + 16. y within a rounding step of the reference and the same for a
    row stride that is not D, the statistics those of y and of the one-tile row within fp32 rounding, the pipelined
    loop bitwise the default one; ragged sequences with an empty and a length-1 one, rows in no segment, pairs across
    chunk ends. The bare kernel keeps the padded row. 16-bit rows of 48 take the split by the default rule
    (``_ROWS_SPLIT_TAIL = None``, here with tails up to 16), the others by ``_ROWS_SPLIT_TAIL = True``."""
    monkeypatch.setattr(rmsnorm_module, "_ROWS_ONE_ROW_MIN_D", 16)
    monkeypatch.setattr(rmsnorm_module, "_MAX_CHUNK", 4)  # several chunks per segment: pairs across chunk ends
    x, w, cu, off = ragged_rows(dim, dtype, seed=9, strided=False)
    monkeypatch.setattr(rmsnorm_module, "_ROWS_SPLIT_TAIL", False)
    y_one, s_one = rmsnorm_angle(x, w, EPS, cu, off)
    by_default = dim % 16 == 0 and dtype != torch.float32
    monkeypatch.setattr(rmsnorm_module, "_ROWS_SPLIT_TAIL", None if by_default else True)
    monkeypatch.setattr(rmsnorm_module, "_ROWS_SPLIT_FROM", 64)
    monkeypatch.setattr(rmsnorm_module, "_ROWS_SPLIT_MAX_TAIL", 16)
    cfg = rmsnorm_module._fwd_config(64, dim, x.element_size(), torch.device(DEV), stats=True)
    assert (cfg.block_t, cfg.block_d, cfg.block_d2) == (1, 32, 16)
    assert rmsnorm_module._fwd_config(64, dim, x.element_size(), torch.device(DEV), stats=False).block_d2 == 0
    y, stats = rmsnorm_angle(x, w, EPS, cu, off)
    assert_matches_default(y, stats, y_one, s_one, x, w, cu, off)
    strided = ragged_rows(dim, dtype, seed=9)[0]  # the same rows, row stride dim + 8
    y_s, s_s = rmsnorm_angle(strided, w, EPS, cu, off)
    assert torch.equal(y_s, y)
    monkeypatch.setattr(rmsnorm_module, "_PIPELINE_STAGES", 2)
    y_p, s_p = rmsnorm_angle(x, w, EPS, cu, off)
    assert torch.equal(y_p, y)
    for a, b, c in zip(stats, s_s, s_p):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_split_tail_default_rule():
    """``_ROWS_SPLIT_TAIL = None`` (the default) splits by dtype and width only, never by layout: 16-bit rows with
    D % 16 == 0 and a tail of at most 1024 (D = 4112-5120: 4096 + 16-1024), aligned or not; not fp32 rows, longer
    tails, widths off the 16-element grid, nor the bare kernel."""
    assert rmsnorm_module._ROWS_SPLIT_TAIL is None

    def tiles(dim, elem_size, aligned=True, stats=True):
        cfg = rmsnorm_module._fwd_config(1 << 20, dim, elem_size, torch.device("cpu"), stats, capability=9,
                                         aligned=aligned)
        return cfg.block_d, cfg.block_d2

    for aligned in (True, False):
        assert tiles(5120, 2, aligned) == (4096, 1024)
        assert tiles(4608, 2, aligned) == (4096, 512)
        assert tiles(4112, 2, aligned) == (4096, 16)
        assert tiles(5120, 4, aligned) == (8192, 0)
    assert tiles(5128, 2, aligned=False) == (8192, 0)  # D % 16 != 0: scalar loads, 242 registers split
    assert tiles(6144, 2) == (8192, 0)  # a tail of 2048: 150 registers, untimed
    assert tiles(5120, 2, stats=False) == (8192, 0)
    assert tiles(4096, 2) == (4096, 0) and tiles(8192, 2) == (8192, 0)


@pytest.mark.parametrize("chunk", [3, 7])
@pytest.mark.parametrize("one_row_min_d", [16, 1 << 30], ids=["one_row_steps", "row_tiles"])
def test_odd_chunks(chunk, one_row_min_d, monkeypatch):
    """Chunks of an odd number of rows (``_MAX_CHUNK`` 3 or 7, as the 255-row variant of bench/fused_variants.py):
    in one-row steps and in 2-row tiles (a chunk ends mid-tile), y is the default chunks' bitwise and the statistics
    those of y; ragged sequences with an empty and a length-1 one, pairs across chunk ends, a row stride not D."""
    monkeypatch.setattr(rmsnorm_module, "_ROWS_ONE_ROW_MIN_D", one_row_min_d)
    monkeypatch.setattr(rmsnorm_module, "_ROWS_TILE", 128)  # 2-row tiles of 64 columns
    monkeypatch.setattr(rmsnorm_module, "_fill_target", lambda device, per_sm: 4 * per_sm)  # 4 "SMs", on GPUs too
    lens = [1, 0, 40, 77, 2]  # 122 rows with the 2 in no sequence: chunks of 7 stay 7 (16 programs wanted)
    x = concentrated((sum(lens) + 2,), 56, seed=5).to(DEV, torch.bfloat16)
    x = torch.cat([x, x[:, :8]], dim=1)[:, :56]  # row stride 64
    w = weight_of(56, torch.bfloat16)
    cu = cu_of(lens)
    off = torch.tensor([[0, 0, 1], [0, 0, 0], [2, 19, 40], [0, 30, 77], [0, 1, 2]], dtype=torch.int32, device=DEV)
    y0, _ = rmsnorm_angle(x, w, EPS, cu, off)
    monkeypatch.setattr(rmsnorm_module, "_MAX_CHUNK", chunk)
    cfg = rmsnorm_module._stats_plan(x, cu, off, None, w).cfg
    assert cfg.chunk == chunk and cfg.block_t == (1 if one_row_min_d == 16 else 2)
    y, stats = rmsnorm_angle(x, w, EPS, cu, off)
    assert torch.equal(y, y0)
    assert_stats_close(stats, angle_stats_reference(y, cu, off))


@pytest.mark.parametrize("seed", range(6))
def test_forward_random_batches(seed, monkeypatch):
    """The fused forward on random ragged batches: dtype, D, sequence lengths (empty ones included), segment offsets
    anywhere in [0, len] (rows before, between and after the segments), rows in no sequence, packed or padded
    (``token_index``), rows per chunk at most 1, 2, 5 or 16, drawn from the seed; y against the reference and the
    bare kernel's, the statistics those of y."""
    g = torch.Generator().manual_seed(200 + seed)
    pick = lambda options: options[int(torch.randint(len(options), (1,), generator=g))]  # noqa: E731
    dtype = pick([torch.bfloat16, torch.float16, torch.float32])
    dim = int(torch.randint(8, 80, (1,), generator=g))
    chunk = pick([1, 2, 5, 16])
    monkeypatch.setattr(rmsnorm_module, "_MAX_CHUNK", chunk)
    cu_packed, off, rows = random_ragged(g, max_seqs=7, max_len=30, max_segments=4, max_trailing=3)
    off = off.to(DEV)
    lens = cu_packed.diff().long()
    if seed % 2:  # padded: each sequence right-aligned in its row of a [N, L] batch
        length = int(lens.max()) + 2
        mask = (torch.arange(length)[None, :] >= length - lens[:, None]).long()
        cu, tok = padded_to_cu_seqlens(mask.to(DEV))
        x = concentrated((lens.numel(), length), dim, seed=seed).to(DEV, dtype)
    else:
        cu, tok = cu_packed.to(DEV), None
        x = concentrated((rows,), dim, seed=seed).to(DEV, dtype)
    w = weight_of(dim, dtype, seed)
    y, stats = rmsnorm_angle(x, w, EPS, cu, off, tok)
    # rstd a step off moves round(x * rstd) by one and w times that by one more: two steps, up to 4x ulp_tol's
    # relative bound low in a binade (seed 0: 2 of 3363 values in fp16, the default forward's alike)
    tol = ulp_tol(dtype)
    torch.testing.assert_close(y, rmsnorm_reference(x, w, EPS), rtol=4 * tol["rtol"], atol=tol["atol"])
    if DEV == "cpu":  # the bare kernel's y, bitwise (on a GPU its warps may sum x² in another order)
        assert torch.equal(y, rmsnorm_angle(x, w, EPS)[0])
    assert_stats_close(stats, angle_stats_reference(y, cu, off, tok))


@pytest.mark.parametrize("n_seq,chunk,padded", [(7, 2, False), (300, 16, True)])
def test_plan_programs_share_the_writes(n_seq, chunk, padded, monkeypatch):
    """The work-list kernel's programs each write a share of the chunks (one column block per region): with one
    column per program (tiles forced to 16 chunks: 23 and 225 programs) the work list is identical, item by item,
    to the one of a single program (``_PLAN_SEQUENCE_READS`` = B), for packed and padded batches, K = 3, and more
    than 256 sequences (blocks carried over)."""
    g = torch.Generator().manual_seed(n_seq)
    lens = torch.randint(0, 12, (n_seq,), generator=g)
    off = torch.minimum(torch.sort(torch.randint(0, 13, (n_seq, 4), generator=g), dim=1).values, lens[:, None])
    off = off.to(torch.int32).to(DEV)
    if padded:
        length = int(lens.max()) + 1
        mask = (torch.arange(length)[None, :] < lens[:, None]).long()
        cu, tok = padded_to_cu_seqlens(mask.to(DEV))
        x = torch.ones(n_seq * length, 16, device=DEV)
    else:
        cu, tok = cu_of(lens.tolist()), None
        x = torch.ones(int(lens.sum()) + 3, 16, device=DEV)
    monkeypatch.setattr(rmsnorm_module, "_MAX_CHUNK", chunk)
    monkeypatch.setattr(rmsnorm_module, "_fill_target", lambda device, per_sm: 1)  # a GPU's 528 would shrink the chunk
    monkeypatch.setattr(rmsnorm_module, "_ROWS_ONE_ROW_MIN_D", 16)  # one-row steps: the chunk is not a row tile
    monkeypatch.setattr(rmsnorm_module, "_PLAN_SEQUENCE_READS", n_seq)  # one program
    one = rmsnorm_module._stats_plan(x, cu, off, tok)
    monkeypatch.setattr(rmsnorm_module, "_PLAN_SEQUENCE_READS", 1 << 30)
    monkeypatch.setattr(rmsnorm_module, "_PLAN_TILE", 16)
    many = rmsnorm_module._stats_plan(x, cu, off, tok)
    assert one.cfg.chunk == many.cfg.chunk == chunk and one.grid == many.grid
    for a, b in zip(one, many):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)


@pytest.mark.parametrize("chunk", [1, 4, 128])
def test_bare_rows_per_program(chunk, monkeypatch):
    """The bare kernel (no statistics) at most 1 row per program (the default), 4 or 128 (the chunk rule then gives
    2: two steps per program, the last chunk partial): the same y, bitwise, one row per step and in 2-D row tiles."""
    dim, rows = 64, 37
    x = concentrated((rows,), dim, seed=8).to(DEV, torch.bfloat16)
    w = weight_of(dim, torch.bfloat16)
    y1, _ = rmsnorm_angle(x, w, EPS)
    monkeypatch.setattr(rmsnorm_module, "_BARE_MAX_CHUNK", chunk)
    for one_row_min_d in (16, 1 << 30):  # one row per step; 2-D row tiles
        monkeypatch.setattr(rmsnorm_module, "_ROWS_ONE_ROW_MIN_D", one_row_min_d)
        cfg = rmsnorm_module._plain_plan(x).cfg
        if DEV == "cpu" and one_row_min_d == 16:  # 16 programs wanted: at most 2 rows each (37 rows, odd)
            assert (cfg.block_t, cfg.chunk) == (1, min(chunk, 2))
        y, stats = rmsnorm_angle(x, w, EPS)
        assert stats is None
        torch.testing.assert_close(y, rmsnorm_reference(x, w, EPS), **ulp_tol(torch.bfloat16))
        assert torch.equal(y, y1)


@pytest.mark.skipif(DEV != "cuda", reason="needs a GPU: the compiled launch shapes of model widths")
@pytest.mark.parametrize("dim,split", [(896, False), (2048, False), (3584, False), (4096, False), (5120, False),
                                       (5120, True), (6144, True)],
                         ids=lambda v: {True: "split", False: "one_tile"}.get(v, v))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_model_widths_compiled(dim, split, dtype, monkeypatch):
    """Model widths at their default launch shapes on a GPU (e.g. the register-capped 4 warps of a 16-bit row of
    4096 on sm_90; 8 or 16 warps elsewhere), and ``split``: with a row as two tiles (``_ROWS_SPLIT_TAIL``, 4096 +
    1024 or 2048 columns): y, statistics and gradients against the float64 reference, ragged sequences with an
    empty and a length-1 one, segments cut off the chunk grid."""
    monkeypatch.setattr(rmsnorm_module, "_ROWS_SPLIT_TAIL", split)
    assert (rmsnorm_module._fwd_config(1 << 20, dim, dtype.itemsize, torch.device(DEV), True).block_d2 > 0) == split
    lens = [1, 0, 300, 77, 513]
    x = concentrated((sum(lens) + 2,), dim, seed=3).to(DEV, dtype).requires_grad_(True)
    w = weight_of(dim, dtype).requires_grad_(True)
    cu = cu_of(lens)
    off = torch.tensor([[0, 0, 1], [0, 0, 0], [5, 150, 299], [0, 1, 77], [2, 257, 400]], dtype=torch.int32,
                       device=DEV)
    y, stats = rmsnorm_angle(x, w, EPS, cu, off)
    y_ref = rmsnorm_reference(x.detach(), w.detach(), EPS)
    if dtype == torch.float32:
        torch.testing.assert_close(y, y_ref, **ulp_tol(dtype))
    else:  # rstd summed in another order than torch's may move round(x * rstd) by a step, and w * that by one more
        torch.testing.assert_close(y, y_ref, rtol=2**-6, atol=0)
        beyond_one_step = (y.detach() - y_ref).abs() > ulp_tol(dtype)["rtol"] * y_ref.abs()
        assert beyond_one_step.float().mean() < 1e-4
    assert_stats_close(stats, angle_stats_reference(y.detach(), cu, off), atol=1e-4)
    dy = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, w), dy)
    xr, wr = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    gx_ref, gw_ref = torch.autograd.grad(rmsnorm_reference(xr, wr, EPS), (xr, wr), dy.double())
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gx.double(), gx_ref, **tol)
    torch.testing.assert_close(gw.double(), gw_ref, rtol=tol["rtol"], atol=tol["atol"] * float(gw_ref.abs().max()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_one_row_steps_on_aligned_rows(dtype, monkeypatch):
    """One-row steps on 16-byte aligned 16-bit rows (D = 64: the vector loads a GPU run compiles), chunks of 1 to 4
    rows, a segment ending mid-chunk. At BLOCK_D <= 1024 the statistics run with the bare kernel's warps, so y is
    the bare kernel's, bitwise."""
    monkeypatch.setattr(rmsnorm_module, "_ROWS_ONE_ROW_MIN_D", 16)
    dim, lens = 64, [1, 2, 3, 17, 9]
    x = concentrated((sum(lens) + 2,), dim, seed=11).to(DEV, dtype)
    w = weight_of(dim, dtype)
    cfg = rmsnorm_module._fwd_config(x.shape[0], dim, x.element_size(), x.device, stats=True)
    assert cfg.block_t == 1
    assert cfg.num_warps == rmsnorm_module._fwd_config(x.shape[0], dim, x.element_size(), x.device, False).num_warps
    cu = cu_of(lens)
    off = torch.tensor([[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 11, 16], [0, 4, 9]], dtype=torch.int32, device=DEV)
    y, stats = rmsnorm_angle(x, w, EPS, cu, off)
    torch.testing.assert_close(y, rmsnorm_reference(x, w, EPS), **ulp_tol(dtype))
    assert torch.equal(y, rmsnorm_angle(x, w, EPS)[0])  # the bare kernel's y, bitwise
    assert_stats_close(stats, angle_stats_reference(y, cu, off))


def test_long_sequence_crosses_chunks(fwd_kernel, monkeypatch):
    """One sequence spanning several chunks, segment cuts off the chunk grid, D = 136 (BLOCK_D 256 / 9 slices);
    the reduce kernel loads 2 chunks x 64 columns per step (a long segment takes several, the last one masked)."""
    monkeypatch.setattr(rmsnorm_module, "_REDUCE_TILE", (2, 64))
    dim, length = 136, 75
    x = concentrated((length,), dim, seed=3).to(DEV, torch.bfloat16)
    w = weight_of(dim, torch.bfloat16)
    cu = cu_of([length])
    off = torch.tensor([[1, 31, 33, 70]], dtype=torch.int32, device=DEV)
    plan = rmsnorm_module._stats_plan(x, cu, off, None)
    assert max((plan.seg_hi - plan.seg_lo).tolist()) > 2 * rmsnorm_module._REDUCE_TILE[0]
    y, stats = rmsnorm_angle(x, w, EPS, cu, off)
    torch.testing.assert_close(y, rmsnorm_reference(x, w, EPS), **ulp_tol(torch.bfloat16))
    assert_stats_close(stats, angle_stats_reference(y, cu, off))


@pytest.mark.parametrize("per_sm", [1, 4, 64])
def test_reduce_tile_by_programs_per_sm(per_sm, monkeypatch):
    """``_REDUCE_PROGRAMS_PER_SM``: the reduce's column blocks narrow (16 at least, 2048 values a step) until the grid
    has about that many programs per SM (4 "SMs" here), and the statistics stay those of y. At 64 per SM the tile
    is 128 chunks x 16 columns: a long segment's chunks in one step."""
    monkeypatch.setattr(rmsnorm_module, "_REDUCE_PROGRAMS_PER_SM", per_sm)
    monkeypatch.setattr(rmsnorm_module, "_MAX_CHUNK", 2)
    dim = 136
    block_c, block_d = rmsnorm_module._reduce_tile(dim, 3, torch.device(DEV))
    assert block_c * block_d == 2048 and 16 <= block_d <= 128
    assert (block_d == 16) == (per_sm == 64) and (block_d == 128) == (per_sm == 1)
    x = concentrated((75,), dim, seed=4).to(DEV, torch.bfloat16)
    w = weight_of(dim, torch.bfloat16)
    cu = cu_of([70])
    off = torch.tensor([[1, 31, 33, 70]], dtype=torch.int32, device=DEV)
    y, stats = rmsnorm_angle(x, w, EPS, cu, off)
    assert_stats_close(stats, angle_stats_reference(y, cu, off))


def test_reduce_tile_on_132_sms(monkeypatch):
    """The tiles docs/fused_forward.md ("Session 28") and the README give for an H100 / H200 (132 SMs): by default
    16 x 128 (56 programs at 8x2048x896, B K = 8); with 4 programs per SM 128 x 16 there (448 programs), 32 x 64 at
    1536 and 2048 (B K = 16), the default from 4096 up."""
    monkeypatch.setattr(rmsnorm_module, "_fill_target", lambda device, per_sm: per_sm * 132)
    tile = lambda dim, n_seg: rmsnorm_module._reduce_tile(dim, n_seg, torch.device("cuda"))  # noqa: E731
    assert tile(896, 8) == (16, 128) and 8 * -(-896 // 128) == 56
    monkeypatch.setattr(rmsnorm_module, "_REDUCE_PROGRAMS_PER_SM", 4)
    assert tile(896, 8) == (128, 16) and 8 * -(-896 // 16) == 448
    assert tile(1536, 16) == tile(2048, 16) == (32, 64)
    assert tile(4096, 64) == tile(5120, 32) == tile(8192, 8) == (16, 128)


def test_non_contiguous_input(packed, fwd_kernel):
    cu, off = packed["cu"], packed["off"]
    x = packed["x"]
    w = weight_of(DIM, torch.float32)
    y_c, s_c = rmsnorm_angle(x, w, EPS, cu, off)
    x_t = x.t().contiguous().t()  # column-major: stride (1, T)
    wide = torch.zeros(x.shape[0], 2 * DIM, device=DEV)
    wide[:, ::2] = x
    for xv in (x_t, wide[:, ::2]):
        assert not xv.is_contiguous()
        y, s = rmsnorm_angle(xv, w, EPS, cu, off)
        # 1-ulp slack: compiled code for other strides may contract to FMAs differently (seen on an H200)
        torch.testing.assert_close(y, y_c, rtol=1e-6, atol=1e-6)
        for a, b in zip(s, s_c):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_strided_weight_and_index_tensors(packed):
    """A strided weight and strided / transposed views of cu_seqlens, seg_offsets and token_index give the results
    of their contiguous copies (the kernels read them densely packed: rmsnorm_angle packs them first)."""
    x, cu, off = packed["x"], packed["cu"], packed["off"]
    w = weight_of(DIM, torch.float32)
    w_view = torch.stack([w, -w], dim=1)[:, 0]
    cu_view = torch.stack([cu, cu + 7], dim=1)[:, 0]
    off_view = off.t().contiguous().t()
    assert not (w_view.is_contiguous() or cu_view.is_contiguous() or off_view.is_contiguous())
    y_c, s_c = rmsnorm_angle(x, w, EPS, cu, off)
    y, s = rmsnorm_angle(x, w_view, EPS, cu_view, off_view)
    assert torch.equal(y, y_c)
    for a, b in zip(s, s_c):
        assert torch.equal(a, b)
    mask = torch.ones(3, 9, dtype=torch.long, device=DEV)
    mask[0, :4] = 0
    mask[2, 6:] = 0
    cu_pad, tok = padded_to_cu_seqlens(mask)
    tok_view = torch.stack([tok, tok.flip(0)], dim=1)[:, 0]
    x3 = concentrated((3, 9), DIM, seed=5).to(DEV)
    want = rmsnorm_angle(x3, w, EPS, cu_pad, None, tok)[1]
    for a, b in zip(rmsnorm_angle(x3, w, EPS, cu_pad, None, tok_view)[1], want):
        assert torch.equal(a, b)
    module = FusedRMSNormAngle.from_rmsnorm(_LlamaLikeRMSNorm(DIM, EPS).to(DEV))
    module.set_segments(cu_view, off_view)
    module(x)
    assert torch.equal(module.stats.count, s_c.count)
    # the ops called directly (what torch.compile runs) pack them too, and a column-strided x
    wide = torch.zeros(x.shape[0], 2 * DIM, device=DEV)
    wide[:, ::2] = x
    out = torch.ops.gainrl.rmsnorm_angle_fwd(wide[:, ::2], w_view, EPS, cu_view, off_view, None)
    torch.testing.assert_close(out[0], y_c, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[2], s_c.unit_sum, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[3], s_c.count)


def test_strided_weight_gradients(packed):
    x = packed["x"][:20].to(torch.bfloat16)
    w = weight_of(DIM, torch.float32)
    grads = []
    for weight in (w.clone(), torch.stack([w, -w], dim=1)[:, 0]):
        xg, wg = x.clone().requires_grad_(), weight.detach().requires_grad_()
        y, _ = rmsnorm_angle(xg, wg, EPS)
        grads.append(torch.autograd.grad((y.float() * torch.arange(DIM, device=DEV)).sum(), (xg, wg)))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_double_backward_raises(packed):
    """The kernels' gradients are not differentiable again: create_graph must raise, not drop the terms."""
    x = packed["x"][:10].clone().requires_grad_()
    y, _ = rmsnorm_angle(x, weight_of(DIM, torch.float32), EPS)
    (gx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gx.pow(2).sum().backward()


def test_deterministic(packed, fwd_kernel):
    w = weight_of(DIM, torch.bfloat16)
    x = packed["x"].to(torch.bfloat16)
    a = rmsnorm_angle(x, w, EPS, packed["cu"], packed["off"])[1]
    b = rmsnorm_angle(x, w, EPS, packed["cu"], packed["off"])[1]
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_padded_batch_left_and_right(fwd_kernel):
    n, length = 4, 13
    mask = torch.zeros(n, length, dtype=torch.long)
    mask[0, 4:] = 1  # left padding
    mask[1, :7] = 1  # right padding
    mask[3, :] = 1  # row 2 stays empty
    cu, token_index = padded_to_cu_seqlens(mask.to(DEV))
    assert cu.tolist() == [0, 9, 16, 16, 29] and cu.dtype == torch.int32
    assert token_index.tolist()[:3] == [4, 5, 6] and token_index.tolist()[9:11] == [13, 14]
    assert token_index.tolist()[16] == 39
    x = concentrated((n, length), DIM, seed=5).to(DEV, torch.bfloat16)
    w = weight_of(DIM, torch.bfloat16)
    off = torch.tensor([[0, 3, 8], [1, 2, 7], [0, 0, 0], [0, 0, 13]], dtype=torch.int32, device=DEV)
    y, stats = rmsnorm_angle(x, w, EPS, cu, off, token_index)
    assert y.shape == x.shape
    torch.testing.assert_close(y, rmsnorm_reference(x, w, EPS), **ulp_tol(torch.bfloat16))  # pad rows too
    assert_stats_close(stats, angle_stats_reference(y, cu, off, token_index))
    # same numbers as the packed layout
    xp = packed_rows(x, token_index)
    yp, sp = rmsnorm_angle(xp, w, EPS, cu, off)
    torch.testing.assert_close(packed_rows(y, token_index), yp, rtol=0, atol=0)
    for a, b in zip(stats, sp):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_matches_angle_stats_of_output(packed, fwd_kernel):
    """Cross-check with the lead's ``angle_stats`` on y (skipped while it is not importable)."""
    try:
        from gainrl_kernels import angle_stats
    except ImportError:
        pytest.skip("gainrl_kernels.angle_stats not available")
    x = packed["x"].to(torch.bfloat16)
    w = weight_of(DIM, torch.bfloat16)
    y, stats = rmsnorm_angle(x, w, EPS, packed["cu"], packed["off"])
    other = angle_stats(y, packed["cu"], packed["off"], backend="torch")
    for a, b in zip(stats, other):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)


# ----------------------------------------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------------------------------------
def test_reference_gradcheck():
    x = concentrated((4,), 6, seed=7).double().requires_grad_()
    w = (1.0 + 0.2 * torch.randn(6, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: rmsnorm_reference(a, b, EPS), (x, w))


def _grads(fn, x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    fn(x, w).backward(dy)
    return x.grad, w.grad


@pytest.mark.parametrize("dtype,tol", [(torch.float32, dict(rtol=1e-5, atol=1e-5)),
                                       (torch.bfloat16, dict(rtol=2e-2, atol=2e-2))])
def test_grads_match_reference(packed, dtype, tol):
    x = packed["x"].to(dtype)
    w = weight_of(DIM, dtype)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(11)).to(DEV, dtype)
    gx, gw = _grads(lambda a, b: rmsnorm_angle(a, b, EPS, packed["cu"], packed["off"])[0], x, w, dy)
    rx, rw = _grads(lambda a, b: rmsnorm_reference(a, b, EPS), x, w, dy)
    assert gx.dtype == dtype and gw.dtype == dtype and gx.shape == x.shape
    torch.testing.assert_close(gx, rx, **tol)
    # dw sums over rows: compare relative to its scale
    torch.testing.assert_close(gw.float(), rw.float(), rtol=tol["rtol"], atol=tol["atol"] * float(rw.abs().max()))


def test_grads_non_contiguous_3d_and_fp32_weight():
    x = concentrated((2, 9), DIM, seed=13).to(DEV)
    x_nc = x.transpose(0, 1)  # [9, 2, D], not contiguous
    w = weight_of(DIM, torch.float32)
    dy = torch.randn(x_nc.shape, generator=torch.Generator().manual_seed(2)).to(DEV)
    gx, gw = _grads(lambda a, b: rmsnorm_angle(a, b, EPS)[0], x_nc, w, dy)
    rx, rw = _grads(lambda a, b: rmsnorm_reference(a, b, EPS), x_nc, w, dy)
    torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-4)
    # a 16-bit input with an fp32 weight: y keeps the input dtype
    y, _ = rmsnorm_angle(x.to(torch.bfloat16), w, EPS)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, rmsnorm_reference(x.to(torch.bfloat16), w, EPS), **ulp_tol(torch.bfloat16))


@pytest.fixture
def small_blocked_backward(monkeypatch):
    """Force the two-pass (column-blocked) backward at small D: 16-wide slices, 4-row tiles."""
    monkeypatch.setattr(backward_module, "_BWD_ROW_MAX", 16)
    monkeypatch.setattr(backward_module, "_BWD_SPLIT_MAX", 16)
    monkeypatch.setattr(backward_module, "_BWD_BLOCKED_TILE", (4, 16, 4))
    assert backward_module._bwd_config(DIM).blocked


@pytest.fixture
def small_split_backward(monkeypatch):
    """Force the two-tile whole-row backward at small D: D = 40 as a 32-wide tile and a 16-wide tail, one row a
    step (as 5120 = 4096 + 1024 on a GPU)."""
    monkeypatch.setattr(backward_module, "_BWD_ROW_MAX", 32)
    cfg = backward_module._bwd_config(DIM)
    assert not cfg.blocked and (cfg.block_t, cfg.block_d, cfg.block_d2) == (1, 32, 16)


@pytest.fixture(params=["blocked", "split"])
def narrow_backward(request):
    """The backward kernels for rows wider than one tile, forced at D = 40."""
    return request.getfixturevalue(f"small_{request.param}_backward")


def _float64_grads(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor):
    return _grads(lambda a, b: rmsnorm_reference(a, b, EPS), x.double(), w.double(), dy.double())


@pytest.mark.parametrize("dtype,tol", [(torch.float32, dict(rtol=1e-5, atol=1e-5)),
                                       (torch.bfloat16, dict(rtol=2e-2, atol=2e-2))])
def test_blocked_backward_matches_reference(packed, narrow_backward, dtype, tol):
    """D = 40 over three 16-wide slices (the last one masked), or a 32-wide tile and a masked 16-wide tail; 77 rows
    over 4 programs of several row tiles."""
    x = packed["x"].to(dtype)
    w = weight_of(DIM, dtype)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(12)).to(DEV, dtype)
    gx, gw = _grads(lambda a, b: rmsnorm_angle(a, b, EPS, packed["cu"], packed["off"])[0], x, w, dy)
    rx, rw = _grads(lambda a, b: rmsnorm_reference(a, b, EPS), x, w, dy)
    torch.testing.assert_close(gx, rx, **tol)
    torch.testing.assert_close(gw.float(), rw.float(), rtol=tol["rtol"], atol=tol["atol"] * float(rw.abs().max()))
    if dtype == torch.float32:
        dx64, dw64 = _float64_grads(x, w, dy)
        torch.testing.assert_close(gx.double(), dx64, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gw.double(), dw64, rtol=1e-5, atol=1e-5 * float(dw64.abs().max()))
    # dw partials are added in a fixed order: bitwise equal run to run
    gx2, gw2 = _grads(lambda a, b: rmsnorm_angle(a, b, EPS)[0], x, w, dy)
    assert torch.equal(gx, gx2) and torch.equal(gw, gw2)


def test_blocked_backward_non_contiguous_3d(narrow_backward):
    x = concentrated((2, 9), DIM, seed=14).to(DEV).transpose(0, 1)  # [9, 2, D], strided rows
    w = weight_of(DIM, torch.float32)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(DEV)
    gx, gw = _grads(lambda a, b: rmsnorm_angle(a, b, EPS)[0], x, w, dy)
    dx64, dw64 = _float64_grads(x, w, dy)
    torch.testing.assert_close(gx.double(), dx64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw.double(), dw64, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("elem_size,limit,stages", [(2, None, 3), (4, 163 * 1024, 3), (4, 99 * 1024, 2),
                                                     (4, 48 * 1024, 0), (2, 64 * 1024, 2)])
def test_backward_stages_fit_the_shared_memory(elem_size, limit, stages):
    """The backward pipelines its row loop with _BWD_STAGES stages where the device's shared memory per block holds
    them, fewer where not (an fp32 row of 4096 on a 99 KiB device: 2), none where not even two fit."""
    cfg = backward_module._bwd_config(4096, elem_size, limit)
    assert cfg.stages == stages
    if limit is not None and stages:
        assert backward_module._bwd_shared_bytes(cfg, elem_size, stages) <= limit
    assert backward_module._bwd_config(8200, elem_size, limit).stages == 0  # the blocked kernel has no stages


def test_backward_register_cap_rule():
    """16-bit rows split as 4096 + a tail of at most 1024, with vector loads, on sm_90 run capped at 64 registers;
    wider tails, fp32, unaligned rows, sm_80, later architectures and the interpreter not."""
    cfg = backward_module._bwd_config
    assert cfg(5120, 2, None, 9, True).maxnreg == 64 and cfg(4608, 2, None, 9, True).maxnreg == 64
    assert cfg(6144, 2, None, 9, True).maxnreg is None and cfg(8192, 2, None, 9, True).maxnreg is None
    assert cfg(5120, 4, None, 9, True).maxnreg is None and cfg(5120, 2, None, 9, False).maxnreg is None
    assert cfg(5120, 2, None, 8, True).maxnreg is None and cfg(5120).maxnreg is None
    assert cfg(5120, 2, None, 10, True).maxnreg is None  # a later architecture: not lowered or timed capped
    assert cfg(4096, 2, None, 9, True).maxnreg is None


@pytest.mark.parametrize("dim,blocked", [(5120, False), (8192, False), (8200, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_dim_backward(dtype, dim, blocked):
    """Wide rows with the launcher's own tiles against float64 / fp32 references: 5120 = 4096 + 1024 and 8192 =
    4096 + 4096 in two tiles, one pass; 8200 blocked (17 slices of 512, two passes)."""
    assert backward_module._bwd_config(dim).blocked == blocked
    x = concentrated((18,), dim, seed=21).to(DEV, dtype)  # 3 programs of 2 row tiles: partial dw re-read
    w = weight_of(dim, dtype)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(22)).to(DEV, dtype)
    y, _ = rmsnorm_angle(x, w, EPS)
    torch.testing.assert_close(y, rmsnorm_reference(x, w, EPS), **ulp_tol(dtype))
    gx, gw = _grads(lambda a, b: rmsnorm_angle(a, b, EPS)[0], x, w, dy)
    if dtype == torch.float32:
        rx, rw = _float64_grads(x, w, dy)
        tol = dict(rtol=1e-5, atol=1e-6)
    else:
        rx, rw = _grads(lambda a, b: rmsnorm_reference(a, b, EPS), x, w, dy)
        tol = dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(gx.to(rx.dtype), rx, **tol)
    torch.testing.assert_close(gw.to(rw.dtype), rw, rtol=tol["rtol"], atol=tol["atol"] * float(rw.abs().max()))


def test_stats_not_differentiable(packed):
    """Eager, and through the registered op's autograd (what torch.compile uses): y is differentiable, rstd and
    the statistics are not."""
    x = packed["x"].clone().requires_grad_()
    _, stats = rmsnorm_angle(x, weight_of(DIM, torch.float32), EPS, packed["cu"], packed["off"])
    assert not stats.unit_sum.requires_grad and not stats.adjacent.requires_grad
    out = torch.ops.gainrl.rmsnorm_angle_fwd(x, weight_of(DIM, torch.float32), EPS, packed["cu"], packed["off"], None)
    assert out[0].requires_grad and not any(t.requires_grad for t in out[1:])


# ----------------------------------------------------------------------------------------------------------------
# torch.library ops and torch.compile
# ----------------------------------------------------------------------------------------------------------------
def test_library_ops_opcheck(packed):
    """The forward and backward ops' schema, fake (meta) and autograd registrations (``torch.library.opcheck``):
    with statistics (segments, a padded batch through token_index) and without."""
    x = torch.cat([packed["x"][:14], packed["x"][:14, :8]], dim=1)[:, :DIM]  # row stride 48
    x = x.to(torch.bfloat16).requires_grad_()
    w = weight_of(DIM, torch.bfloat16).requires_grad_()
    mask = torch.ones(2, 7, dtype=torch.long, device=DEV)
    mask[0, :3] = 0
    cu_pad, tok = padded_to_cu_seqlens(mask)
    off = torch.tensor([[0, 1, 4], [2, 2, 6]], dtype=torch.int32, device=DEV)
    for args in ((x, w, EPS, cu_pad, off, tok), (x, w, EPS, None, None, None)):
        torch.library.opcheck(torch.ops.gainrl.rmsnorm_angle_fwd.default, args)
    y, rstd, *_ = torch.ops.gainrl.rmsnorm_angle_fwd(x.detach(), w.detach(), EPS, None, None, None)
    torch.library.opcheck(torch.ops.gainrl.rmsnorm_angle_bwd.default, (x.detach(), w.detach(), rstd, torch.ones_like(y)))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(packed, backend):
    """Under torch.compile (fullgraph) the fused norm is the opaque op: y, the statistics and the gradients are
    bitwise those of the eager call, for the function and for the module (which keeps its statistics)."""
    x = packed["x"].to(torch.bfloat16)
    w = weight_of(DIM, torch.bfloat16)

    def loss_and_stats(x, w, cu, off):
        y, stats = rmsnorm_angle(x, w, EPS, cu, off)
        return (y.float() ** 2).sum(), stats

    eager_x, eager_w = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss, stats = loss_and_stats(eager_x, eager_w, packed["cu"], packed["off"])
    grads = torch.autograd.grad(loss, (eager_x, eager_w))
    c_x, c_w = x.clone().requires_grad_(), w.clone().requires_grad_()
    c_loss, c_stats = torch.compile(loss_and_stats, backend=backend, fullgraph=True)(c_x, c_w, packed["cu"],
                                                                                     packed["off"])
    torch.testing.assert_close(c_loss, loss, rtol=1e-6, atol=0)
    for a, b in zip(c_stats, stats):
        assert torch.equal(a, b)
    for a, b in zip(torch.autograd.grad(c_loss, (c_x, c_w)), grads):
        assert torch.equal(a, b)
    module = FusedRMSNormAngle(DIM, eps=EPS, device=DEV, dtype=torch.bfloat16)
    with torch.no_grad():
        module.weight.copy_(w)
    module.set_segments(packed["cu"], packed["off"])
    y_c = torch.compile(module, backend=backend, fullgraph=True)(x)
    assert torch.equal(y_c, rmsnorm_angle(x, w, EPS)[0])
    for a, b in zip(module.stats, stats):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------------------------
# module
# ----------------------------------------------------------------------------------------------------------------
class _LlamaLikeRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        dtype = h.dtype
        h = h.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)


def test_module_drop_in(packed):
    base = _LlamaLikeRMSNorm(DIM, 1e-5).to(DEV)
    with torch.no_grad():
        base.weight.copy_(weight_of(DIM, torch.float32))
    fused = FusedRMSNormAngle.from_rmsnorm(base)
    assert fused.weight is base.weight and fused.variance_epsilon == 1e-5
    x = packed["x"]
    torch.testing.assert_close(fused(x), base(x), **ulp_tol(torch.float32))
    assert fused.stats is None
    fused.set_segments(packed["cu"], packed["off"])
    y = fused(x)
    assert_stats_close(fused.stats, angle_stats_reference(y, packed["cu"], packed["off"]))
    mask = torch.ones(2, 6, dtype=torch.long, device=DEV)
    mask[0, :2] = 0
    fused.set_attention_mask(mask)
    x3 = concentrated((2, 6), DIM, seed=4).to(DEV)
    fused(x3)
    assert fused.stats.count[:, 0].tolist() == [4, 6]
    fused.clear_segments()
    assert fused.stats is None
    assert "eps=1e-05" in repr(fused)


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16),
                                             (torch.float32, torch.bfloat16)])
def test_module_output_dtype_is_hfs(packed, x_dtype, w_dtype):
    """HF returns promote_types(x, weight): a 16-bit input with a wider weight (Qwen3's q / k norms under autocast)
    gives the wider dtype, computed as HF does (weight times the normalised rows rounded to x's dtype), with
    gradients for x and the weight; statistics are refused there outside autocast."""
    base = _LlamaLikeRMSNorm(DIM, EPS).to(DEV, w_dtype)
    with torch.no_grad():
        base.weight.copy_(weight_of(DIM, w_dtype))
    fused = FusedRMSNormAngle.from_rmsnorm(base)
    x = concentrated((3, 5), DIM, seed=6).to(DEV, x_dtype)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    outs = [m(xi) for m, xi in zip((base, fused), xs)]
    assert outs[1].dtype == outs[0].dtype == torch.promote_types(x_dtype, w_dtype)
    torch.testing.assert_close(outs[1], outs[0], **ulp_tol(x_dtype))
    dy = torch.randn(outs[0].shape, generator=torch.Generator().manual_seed(2)).to(DEV, outs[0].dtype)
    grads = [torch.autograd.grad(o, (xi, m.weight), dy) for o, xi, m in zip(outs, xs, (base, fused))]
    tol = dict(rtol=2e-2, atol=2e-2)
    for a, b in zip(*grads):
        torch.testing.assert_close(b.float(), a.float(), **tol)
    fused.set_segments(cu_of([15]))
    if outs[0].dtype != x_dtype:
        with pytest.raises(ValueError, match="hidden_states: .* weight: HF.s norm returns torch.float32 here"):
            fused(x)
    else:
        fused(x)
        assert fused.stats is not None


# ----------------------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------------------
def test_validation_errors(packed):
    x, cu, off = packed["x"], packed["cu"], packed["off"]
    w = weight_of(DIM, torch.float32)
    cases = [
        ("x", dict(x=x[0])),
        ("x", dict(x=x.double())),
        ("weight", dict(weight=w[:-1])),
        ("weight", dict(weight=w.long())),
        ("eps", dict(eps=-1.0)),
        ("cu_seqlens", dict(cu_seqlens=cu.long())),
        ("cu_seqlens", dict(cu_seqlens=cu.view(1, -1))),
        ("cu_seqlens", dict(cu_seqlens=torch.tensor([0, 5, 3], dtype=torch.int32, device=DEV), seg_offsets=None)),
        ("cu_seqlens", dict(cu_seqlens=torch.tensor([0, 500], dtype=torch.int32, device=DEV), seg_offsets=None)),
        ("seg_offsets", dict(seg_offsets=off[:2])),
        ("seg_offsets", dict(seg_offsets=off.long())),
        ("seg_offsets", dict(seg_offsets=off.flip(1))),
        ("seg_offsets", dict(seg_offsets=off + 100)),
        ("token_index", dict(token_index=torch.arange(70, device=DEV).float())),
        ("token_index", dict(token_index=torch.arange(70, device=DEV).flip(0))),
    ]
    for name, kw in cases:
        args = dict(x=x, weight=w, eps=EPS, cu_seqlens=cu, seg_offsets=off)
        args.update(kw)
        with pytest.raises(ValueError, match=name):
            rmsnorm_angle(**args)
    with pytest.raises(ValueError, match="seg_offsets"):
        rmsnorm_angle(x, w, EPS, None, off)
    with pytest.raises(ValueError, match="attention_mask"):
        padded_to_cu_seqlens(torch.tensor([[1, 0, 1]]))
    with pytest.raises(ValueError, match="attention_mask"):
        padded_to_cu_seqlens(torch.ones(3))
