"""AngleProbe inside HF model forwards: metrics equal the float64 reference computed from hooked activations."""
from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from gainrl_kernels.naive import naive_angle_metrics  # noqa: E402
from gainrl_kernels.probe import (  # noqa: E402
    AngleProbe,
    EarlyExit,
    cu_seqlens_from_position_ids,
    find_decoder_layers,
    padded_pack_index,
    probe_forward,
)
from tiny_models import tiny_lm  # noqa: E402

LENS = [9, 3, 14, 6, 1]
METRICS = ("intra", "inter", "score", "causal", "causal_ref")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny matmuls run on one thread


@pytest.fixture(scope="module")
def models():
    return {kind: tiny_lm(kind) for kind in ("llama", "qwen2")}


def make_batch(layout: str, lens=LENS, seed: int = 0, pad_id: int = 2) -> dict:
    """Model inputs for a batch of random sequences in the given layout, plus per-sequence token index lists
    (``where[b]`` = positions of sequence b's tokens in the flattened [N*L] activation) and seg_offsets."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(3, 400, (n,), generator=g) for n in lens]
    seg = []
    for n in lens:
        a = int(torch.randint(0, n + 1, (1,), generator=g))
        b = int(torch.randint(a, n + 1, (1,), generator=g))
        seg.append([0, a, b] if n > 2 else [0, 0, n])
    seg = torch.tensor(seg, dtype=torch.int32)
    if layout in ("left", "right"):
        width = max(lens)
        ids = torch.full((len(lens), width), pad_id)
        mask = torch.zeros(len(lens), width, dtype=torch.long)
        where = []
        for b, s in enumerate(seqs):
            start = width - len(s) if layout == "left" else 0
            ids[b, start : start + len(s)] = s
            mask[b, start : start + len(s)] = 1
            where.append(list(range(b * width + start, b * width + start + len(s))))
        pos = (mask.cumsum(1) - 1).clamp_min(0)
        return dict(kwargs=dict(input_ids=ids, attention_mask=mask, position_ids=pos), seg=seg, where=where,
                    batch=dict(attention_mask=mask))
    ids = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    where = [list(range(int(cu[b]), int(cu[b + 1]))) for b in range(len(lens))]
    batch = dict(cu_seqlens=cu) if layout == "packed_cu" else dict(position_ids=pos)
    return dict(kwargs=dict(input_ids=ids, position_ids=pos), seg=seg, where=where, batch=batch)


def hooked_activation(model, layer: int, kwargs: dict) -> torch.Tensor:
    """The up_proj input of ``layer``, flattened to [N*L, D], from a plain forward (no probe)."""
    got = []
    up = find_decoder_layers(model)[layer].mlp.up_proj
    handle = up.register_forward_pre_hook(lambda m, args: got.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            model(**kwargs)
    finally:
        handle.remove()
    assert len(got) == 1
    return got[0].reshape(-1, got[0].shape[-1])


def reference(flat: torch.Tensor, where: list[list[int]], seg: torch.Tensor, inter_weight: float = 1.0) -> dict:
    packed = torch.cat([flat[w] for w in where])
    cu = torch.zeros(len(where) + 1, dtype=torch.int64)
    cu[1:] = torch.tensor([len(w) for w in where]).cumsum(0)
    return naive_angle_metrics(packed, cu, seg, inter_weight)


def assert_metrics_close(conc, ref) -> None:
    for name in METRICS:
        torch.testing.assert_close(getattr(conc, name).double(), ref[name], rtol=1e-5, atol=2e-6, equal_nan=True,
                                   msg=lambda m, name=name: f"{name}: {m}")


def run_and_check(probe: AngleProbe, b: dict, ref: dict, early_exit: bool):
    """One probed forward of batch ``b``: the output is None exactly on early exit, one capture, and the metrics
    (inter_weight 0.5) and counts are ``ref``'s. Returns the model output."""
    probe.set_batch(b["seg"], **b["batch"])
    out = probe.run(**b["kwargs"])
    assert (out is None) == early_exit
    assert probe.captures == 1
    assert_metrics_close(probe.metrics(inter_weight=0.5), ref)
    torch.testing.assert_close(probe.stats.count, ref["count"].int())
    return out


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("layout", ["left", "right", "packed_cu", "packed_pos"])
@pytest.mark.parametrize("early_exit", [False, True])
def test_probe_matches_float64_reference(models, kind, layout, early_exit):
    model = models[kind]
    b = make_batch(layout)
    for layer in (-1, 0):
        ref = reference(hooked_activation(model, layer, b["kwargs"]), b["where"], b["seg"], inter_weight=0.5)
        with AngleProbe(model, layer=layer, early_exit=early_exit) as probe, torch.no_grad():
            run_and_check(probe, b, ref, early_exit)


def test_whole_rows_without_set_batch(models):
    model = models["llama"]
    ids = torch.randint(3, 400, (3, 7), generator=torch.Generator().manual_seed(1))
    flat = hooked_activation(model, -1, dict(input_ids=ids))
    ref = naive_angle_metrics(flat, torch.arange(4) * 7)
    with AngleProbe(model) as probe, torch.no_grad():
        model(input_ids=ids)
        assert_metrics_close(probe.metrics(), ref)
        probe.set_batch(None, attention_mask=torch.ones(3, 7))  # whole sequences from a mask, K = 1
        model(input_ids=ids)
        assert_metrics_close(probe.metrics(), ref)


def test_backend_torch_and_inference_mode(models):
    model = models["qwen2"]
    b = make_batch("left", seed=3)
    ref = reference(hooked_activation(model, -1, b["kwargs"]), b["where"], b["seg"])
    with AngleProbe(model, backend="torch") as probe, torch.inference_mode():
        probe.set_batch(b["seg"], **b["batch"])
        model(**b["kwargs"])
        assert_metrics_close(probe.metrics(), ref)


def test_probe_forward_helper_and_early_exit_skips_the_rest(models):
    model = models["llama"]
    b = make_batch("right", seed=4)
    ref = reference(hooked_activation(model, 0, b["kwargs"]), b["where"], b["seg"])
    called = []
    watched = [model.lm_head, model.model.norm, model.model.layers[1], model.model.layers[0].mlp.up_proj]
    handles = [m.register_forward_hook(lambda m, a, o, i=i: called.append(i)) for i, m in enumerate(watched)]
    try:
        stats = probe_forward(model, b["kwargs"]["input_ids"], b["kwargs"]["attention_mask"], b["seg"], layer=0)
    finally:
        for h in handles:
            h.remove()
    assert called == [], "early exit ran a module after the target layer's MLP input"
    from gainrl_kernels import angle_concentration

    assert_metrics_close(angle_concentration(stats), ref)
    with AngleProbe(model, early_exit=True) as probe, pytest.raises(EarlyExit) as info, torch.no_grad():
        model(input_ids=b["kwargs"]["input_ids"])
    assert info.value.stats is probe.stats


def _hook_counts(model: nn.Module) -> list[int]:
    return [
        len(d)
        for m in model.modules()
        for d in (m._forward_pre_hooks, m._forward_hooks, m._backward_hooks, m._forward_hooks_with_kwargs)
    ]


def test_model_unchanged_after_detach(models):
    model = models["qwen2"]
    b = make_batch("left", seed=5)
    with torch.no_grad():
        before = model(**b["kwargs"]).logits
    hooks, state = _hook_counts(model), {k: v.clone() for k, v in model.state_dict().items()}
    for early in (False, True):
        with AngleProbe(model, early_exit=early) as probe, torch.no_grad():
            probe.set_batch(b["seg"], **b["batch"])
            probe.run(**b["kwargs"])
            assert _hook_counts(model) != hooks
    probe = AngleProbe(model, layer=0)
    probe.remove()
    probe.remove()  # idempotent
    assert _hook_counts(model) == hooks
    with torch.no_grad():
        after = model(**b["kwargs"]).logits
    assert torch.equal(before, after)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert probe.stats is None  # the removed probe saw nothing


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_captures_once(use_reentrant):
    model = tiny_lm("llama", seed=7)
    b = make_batch("right", seed=6)
    ref = reference(hooked_activation(model, -1, b["kwargs"]), b["where"], b["seg"])
    model.train()
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    mlp_calls = []
    handle = find_decoder_layers(model)[-1].mlp.register_forward_pre_hook(lambda m, a: mlp_calls.append(1))
    try:
        with AngleProbe(model) as probe:
            probe.set_batch(b["seg"], **b["batch"])
            out = model(**b["kwargs"], labels=b["kwargs"]["input_ids"], use_cache=False)
            out.loss.backward()
            assert len(mlp_calls) == 2, "the layer was not recomputed: the test does not exercise checkpointing"
            assert probe.captures == 1
            assert_metrics_close(probe.metrics(), ref)
    finally:
        handle.remove()
    assert all(p.grad is not None for p in model.model.layers[-1].mlp.parameters())


def test_autograd_through_probed_forward(models):
    b = make_batch("left", seed=8)
    grads = []
    for probed in (False, True):
        model = tiny_lm("qwen2", seed=9).train()
        probe = AngleProbe(model) if probed else None
        if probe:
            probe.set_batch(b["seg"], **b["batch"])
        loss = model(**b["kwargs"], labels=b["kwargs"]["input_ids"]).loss
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        if probe:
            assert not probe.stats.unit_sum.requires_grad
            ref = reference(hooked_activation(model, -1, b["kwargs"]), b["where"], b["seg"])
            assert_metrics_close(probe.metrics(), ref)
            probe.remove()
    assert all(torch.equal(a, c) for a, c in zip(*grads))


def test_batch_mismatch_and_disabled(models):
    model = models["llama"]
    b = make_batch("right", seed=10)
    with AngleProbe(model) as probe, torch.no_grad():
        probe.set_batch(b["seg"], **b["batch"])
        with pytest.raises(ValueError, match="set_batch"):
            model(input_ids=b["kwargs"]["input_ids"][:, :4])
        with probe.disabled():
            model(input_ids=b["kwargs"]["input_ids"][:, :4])
        assert probe.stats is None and probe.captures == 0
        with pytest.raises(RuntimeError, match="no forward"):
            probe.metrics()
        with pytest.raises(ValueError, match="rows"):
            probe.set_batch(b["seg"][:2], **b["batch"])


def test_pack_index_helpers():
    mask = torch.tensor([[0, 1, 1], [1, 1, 0], [0, 0, 0], [1, 0, 1]])
    perm, cu = padded_pack_index(mask)
    assert cu.tolist() == [0, 2, 4, 4, 6]
    assert perm[:6].tolist() == [1, 2, 3, 4, 9, 11]
    assert sorted(perm.tolist()) == list(range(12))
    pos = torch.tensor([0, 1, 2, 0, 0, 1, 0, 0])
    assert cu_seqlens_from_position_ids(pos, 3).tolist() == [0, 3, 4, 6]
    assert cu_seqlens_from_position_ids(pos[None], 5).tolist() == [0, 3, 4, 6, 7, 8]


def test_find_decoder_layers_errors(models):
    assert find_decoder_layers(models["llama"]) is models["llama"].model.layers
    with pytest.raises(ValueError, match="no decoder layers"):
        find_decoder_layers(nn.Sequential(nn.Linear(2, 2)))

    class FusedMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up_proj = nn.Linear(2, 4)

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = nn.Identity()
            self.post_attention_layernorm = nn.Identity()
            self.mlp = FusedMLP()

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Layer(), Layer()])

    with pytest.raises(ValueError, match="up_proj"):
        find_decoder_layers(Model())
    with pytest.raises(ValueError, match="layer"):
        AngleProbe(models["llama"], layer=2)


def test_peft_wrapped_model():
    """A LoRA-wrapped model (LoRA on up_proj too: the probe reads the MLP input, before any adapter), under
    no_grad and while training the adapters with gradient checkpointing; detaching leaves the wrapper unchanged."""
    peft = pytest.importorskip("peft")
    model = tiny_lm("llama", seed=11)
    b = make_batch("left", seed=12)
    wrapped = peft.get_peft_model(
        model, peft.LoraConfig(r=2, target_modules=["q_proj", "up_proj"], init_lora_weights=False)
    )
    ref = reference(hooked_activation(wrapped, -1, b["kwargs"]), b["where"], b["seg"])
    with AngleProbe(wrapped) as probe, torch.no_grad():
        probe.set_batch(b["seg"], **b["batch"])
        wrapped(**b["kwargs"])
        assert_metrics_close(probe.metrics(), ref)

    wrapped.train()
    wrapped.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hooks_before = _hook_counts(wrapped)
    with AngleProbe(wrapped) as probe:
        probe.set_batch(b["seg"], **b["batch"])
        wrapped(**b["kwargs"], labels=b["kwargs"]["input_ids"], use_cache=False).loss.backward()
        assert probe.captures == 1
        assert_metrics_close(probe.metrics(), ref)
    assert _hook_counts(wrapped) == hooks_before
    trained = {n for n, p in wrapped.named_parameters() if p.grad is not None}
    assert trained and all("lora_" in n for n in trained)
