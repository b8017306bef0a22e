"""Bad arguments raise ValueError naming the argument."""
import pytest
import torch

from gainrl_kernels import angle_concentration, angle_stats


def _ok():
    hidden = torch.randn(10, 4)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    seg = torch.tensor([[0, 2, 4], [0, 1, 5]], dtype=torch.int32)
    return hidden, cu, seg


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda h, cu, s: (h[None], cu, s), "hidden: expected a 2-D"),
        (lambda h, cu, s: (h.double(), cu, s), "hidden: expected dtype"),
        (lambda h, cu, s: (h.int(), cu, s), "hidden: expected dtype"),
        (lambda h, cu, s: (h[:, :0], cu, s), "hidden: the feature dimension"),
        (lambda h, cu, s: (h, cu.long(), s), "cu_seqlens: expected dtype int32"),
        (lambda h, cu, s: (h, cu[None], s), "cu_seqlens: expected a 1-D"),
        (lambda h, cu, s: (h, torch.tensor([1, 4, 9], dtype=torch.int32), s), r"cu_seqlens: expected cu_seqlens\[0\] == 0"),
        (lambda h, cu, s: (h, torch.tensor([0, 5, 4], dtype=torch.int32), s), "cu_seqlens: expected non-decreasing"),
        (lambda h, cu, s: (h, torch.tensor([0, 4, 11], dtype=torch.int32), s), "cu_seqlens: last value 11 is past"),
        (lambda h, cu, s: (h, cu, s[:1]), r"seg_offsets: expected shape \[B, K\+1\]"),
        (lambda h, cu, s: (h, cu, s[:, :1]), r"seg_offsets: expected shape \[B, K\+1\]"),
        (lambda h, cu, s: (h, cu, s.long()), "seg_offsets: expected dtype int32"),
        (lambda h, cu, s: (h, cu, torch.tensor([[0, 2, 5], [0, 1, 5]], dtype=torch.int32)), "seg_offsets: offset 5 at \\[0, 2\\] is outside sequence 0"),
        (lambda h, cu, s: (h, cu, torch.tensor([[0, 2, 4], [-1, 1, 5]], dtype=torch.int32)), "seg_offsets: offset -1"),
        (lambda h, cu, s: (h, cu, torch.tensor([[0, 3, 2], [0, 1, 5]], dtype=torch.int32)), "seg_offsets: expected non-decreasing"),
    ],
)
def test_bad_arguments(mutate, match):
    with pytest.raises(ValueError, match=match):
        angle_stats(*mutate(*_ok()))


def test_bad_backend_and_device():
    h, cu, s = _ok()
    with pytest.raises(ValueError, match="backend: expected one of"):
        angle_stats(h, cu, s, backend="numpy")
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        angle_stats(h, cu, s, backend="cuda")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="cu_seqlens: expected device"):
            angle_stats(h.cuda(), cu, s)


def test_unvalidated_bad_offsets_stay_in_bounds():
    """validate_values=False skips the value checks (no host sync); kernels clamp instead of reading out of bounds,
    and the PyTorch backend clamps its counts the same way."""
    from gainrl_kernels.torch_impl import angle_stats_torch

    h, _, _ = _ok()
    for cu, seg in ((torch.tensor([0, 4, 99], dtype=torch.int32), torch.tensor([[0, 7, 2], [-3, 1, 500]])),
                    (torch.tensor([-3, 6, 10], dtype=torch.int32), torch.tensor([[0, 1, 9], [0, 2, 3]]))):
        seg = seg.to(torch.int32)
        stats = angle_stats(h, cu, seg, validate_values=False)
        assert stats.count.min() >= 0 and stats.count.sum() <= h.shape[0]
        assert torch.equal(angle_stats_torch(h, cu, seg).count, stats.count)


def test_registered_ops_check_their_arguments():
    """torch.ops.gainrl.* called directly check the metadata (no host sync) instead of reading out of bounds."""
    h, cu, seg = _ok()
    with pytest.raises(ValueError, match="seg_offsets: expected shape"):
        torch.ops.gainrl.angle_stats(h, cu[:1], seg, "auto")
    with pytest.raises(ValueError, match="backend"):
        torch.ops.gainrl.angle_stats(h, cu, seg, "bogus")
    with pytest.raises(ValueError, match="cu_seqlens: expected dtype"):
        torch.ops.gainrl.angle_stats(h, cu.long(), seg, "auto")
    stats = angle_stats(h, cu, seg)
    with pytest.raises(ValueError, match=r"stats: inconsistent shapes.*adjacent \(1,\)"):
        torch.ops.gainrl.angle_concentration(*stats[:3], stats.adjacent[:1], 1.0)
    with pytest.raises(ValueError, match="stats: count must be a tensor"):
        angle_concentration((stats.unit_sum, [1, 2], stats.sq_norm, stats.adjacent))


def test_triton_interpret_read_as_triton_reads_it(monkeypatch):
    from gainrl_kernels.validate import triton_interpreting

    for value, on in (("1", True), ("true", True), ("ON", True), ("0", False), ("off", False), ("", False)):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert triton_interpreting() is on, value


def test_bad_stats():
    with pytest.raises(ValueError, match="stats: expected the AngleStats"):
        angle_concentration(torch.zeros(3))


def test_triton_launches_run_on_the_tensors_device(monkeypatch):
    """A CUDA tensor on another GPU than the current one: the launching function runs with its device current."""
    import contextlib

    from gainrl_kernels.validate import on_first_tensors_device

    class FakeCuda:
        is_cuda = True
        device = torch.device("cuda", 1)

    entered = []

    @contextlib.contextmanager
    def fake_device(device):
        entered.append(device)
        yield

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", fake_device)
    monkeypatch.setattr(torch, "Tensor", object)  # FakeCuda passes the isinstance check

    @on_first_tensors_device
    def launch(x, y=1):
        return len(entered), y

    assert launch(FakeCuda(), y=2) == (1, 2) and entered == [torch.device("cuda", 1)]
    assert launch(x=FakeCuda()) == (2, 1)  # by keyword too
    FakeCuda.device = torch.device("cuda", 0)
    assert launch(FakeCuda()) == (2, 1)  # already current: no switch
