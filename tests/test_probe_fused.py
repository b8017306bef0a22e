"""AngleProbe(fused=...) and gainrl_kernels.patching: the fused RMSNorm + angle kernel in place of the probed layer's
norm gives the hook path's statistics and the model's outputs and gradients, and leaves the model as it was.

Runs on CPU tensors through the Triton interpreter (TRITON_INTERPRET=1, set before triton is imported).
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

pytest.importorskip("transformers")

from gainrl_kernels.naive import naive_angle_metrics  # noqa: E402
from gainrl_kernels.patching import (  # noqa: E402
    apply_fused_rmsnorm_angle,
    llama_rmsnorm_problem,
    revert_fused_rmsnorm_angle,
)
from gainrl_kernels.probe import AngleProbe, find_decoder_layers, probe_forward  # noqa: E402
from gainrl_kernels.rmsnorm_angle import FusedRMSNormAngle, consecutive_tokens, padded_to_cu_seqlens  # noqa: E402
from test_probe import (  # noqa: E402
    METRICS,
    assert_metrics_close,
    hooked_activation,
    make_batch,
    reference,
    run_and_check,
)
from tiny_models import tiny_lm  # noqa: E402
from triton_env import needs_triton, triton_device  # noqa: E402

pytestmark = [needs_triton, pytest.mark.usefixtures("one_thread")]
DEV = triton_device()  # CUDA tensors for compiled Triton on a GPU machine, else CPU ones for the interpreter


@pytest.fixture(scope="module")
def models():
    return {kind: tiny_lm(kind).to(DEV) for kind in ("llama", "qwen2")}


def batch_on_device(layout: str, seed: int) -> dict:
    """:func:`test_probe.make_batch` with its tensors on DEV."""
    b = make_batch(layout, seed=seed)
    move = lambda d: {k: v.to(DEV) if isinstance(v, torch.Tensor) else v for k, v in d.items()}  # noqa: E731
    return dict(b, kwargs=move(b["kwargs"]), batch=move(b["batch"]), seg=b["seg"].to(DEV))


class GemmaStyleNorm(nn.Module):
    """(1 + w) scaling and an `eps` attribute, as Gemma's RMSNorm: not the fused kernel's formula."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim) * 0.1)
        self.eps = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


class ScaledNorm(nn.Module):
    """LlamaRMSNorm's attributes, another formula (y = 2 w n): refused by the numeric check."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return 2 * self.weight * h.to(x.dtype)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("layout", ["left", "right", "packed_cu", "packed_pos"])
@pytest.mark.parametrize("early_exit", [False, True])
def test_fused_probe_matches_reference_and_model(models, kind, layout, early_exit):
    model = models[kind]
    b = batch_on_device(layout, seed=2)
    ref = reference(hooked_activation(model, -1, b["kwargs"]), b["where"], b["seg"], inter_weight=0.5)
    with torch.no_grad():
        want = model(**b["kwargs"]).logits
    norm_before = find_decoder_layers(model)[-1].post_attention_layernorm
    with AngleProbe(model, early_exit=early_exit, fused=True) as probe, torch.no_grad():
        assert isinstance(probe.fused, FusedRMSNormAngle)
        assert find_decoder_layers(model)[-1].post_attention_layernorm is probe.fused
        out = run_and_check(probe, b, ref, early_exit)
        if not early_exit:
            torch.testing.assert_close(out.logits, want, rtol=1e-5, atol=1e-5)
    assert find_decoder_layers(model)[-1].post_attention_layernorm is norm_before  # put back by remove()


def test_whole_rows_probe_forward_and_first_layer(models):
    model = models["llama"]
    ids = torch.randint(3, 400, (3, 7), generator=torch.Generator().manual_seed(1)).to(DEV)
    for layer in (0, -1):
        ref = naive_angle_metrics(hooked_activation(model, layer, dict(input_ids=ids)), torch.arange(4, device=DEV) * 7)
        with AngleProbe(model, layer=layer, fused=True) as probe, torch.no_grad():
            model(input_ids=ids)  # no set_batch: every row one whole sequence
            assert_metrics_close(probe.metrics(), ref)
        mask = torch.ones(3, 7, dtype=torch.long, device=DEV)
        stats = probe_forward(model, ids, mask, None, layer=layer, fused=True)
        torch.testing.assert_close(stats.unit_sum, probe.stats.unit_sum)


def test_state_dict_and_parameters_unchanged(models):
    model = models["qwen2"]
    keys = list(model.state_dict())
    params = [id(p) for p in model.parameters()]
    with AngleProbe(model, fused="on"):
        assert list(model.state_dict()) == keys  # the fused norm holds the same `weight` Parameter, nothing else
        assert [id(p) for p in model.parameters()] == params
    assert list(model.state_dict()) == keys


@pytest.mark.parametrize("gc", [False, True])
def test_gradients_and_checkpointing(gc):
    b = batch_on_device("right", seed=6)
    grads, concs = [], []
    for fused in (False, True):
        model = tiny_lm("llama", seed=7).to(DEV).train()
        if gc and hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable({"use_reentrant": False})
        elif gc:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        with AngleProbe(model, fused=fused) as probe:
            probe.set_batch(b["seg"], **b["batch"])
            out = model(**b["kwargs"], labels=b["kwargs"]["input_ids"], use_cache=False)
            out.loss.backward()
            assert probe.captures == 1  # a recomputation is not a capture
            assert not probe.stats.unit_sum.requires_grad
            concs.append(probe.metrics())
        grads.append([p.grad.clone() for p in model.parameters()])
    for name in METRICS:
        torch.testing.assert_close(getattr(concs[1], name), getattr(concs[0], name), rtol=1e-5, atol=2e-6,
                                   equal_nan=True)
    for a, c in zip(*grads):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-6)


def test_holey_mask_gives_nan_rows_only(models):
    model = models["llama"]
    b = batch_on_device("right", seed=4)
    mask = b["batch"]["attention_mask"].clone()
    mask[2, 1] = 0  # a hole inside row 2 (14 tokens)
    kwargs = dict(b["kwargs"], attention_mask=mask)
    with AngleProbe(model) as hook, torch.no_grad():
        hook.set_batch(b["seg"], attention_mask=mask)
        model(**kwargs)
        want = hook.metrics()
    with AngleProbe(model, fused=True) as probe, torch.no_grad():
        probe.set_batch(b["seg"], attention_mask=mask)
        model(**kwargs)
        got = probe.metrics()
    assert torch.isnan(got.score[2]) and torch.isnan(got.causal[2])
    keep = torch.tensor([0, 1, 3, 4], device=DEV)
    torch.testing.assert_close(got.causal[keep], want.causal[keep], rtol=1e-5, atol=2e-6, equal_nan=True)


def test_disabled_forward_and_batch_mismatch(models):
    model = models["llama"]
    b = batch_on_device("right", seed=10)
    ids = b["kwargs"]["input_ids"][:, :4]
    with torch.no_grad():
        want = model(input_ids=ids).logits
    with AngleProbe(model, fused=True) as probe, torch.no_grad():
        probe.set_batch(b["seg"], **b["batch"])
        with pytest.raises(ValueError, match="set_batch"):
            model(input_ids=ids)
        with probe.disabled():
            got = model(input_ids=ids).logits  # a plain (fused-kernel) RMSNorm, no statistics
        assert probe.stats is None and probe.captures == 0
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_mlp_input_must_be_the_norms_output(models):
    model = models["llama"]
    with AngleProbe(model, fused=True) as probe, torch.no_grad():
        handle = probe.fused.register_forward_hook(lambda m, a, out: out * 1.0)  # something between norm and MLP
        with pytest.raises(RuntimeError, match="not the output of its fused norm"):
            model(input_ids=torch.tensor([[5, 6, 7]], device=DEV))
        handle.remove()
        assert probe.stats is None
        model(input_ids=torch.tensor([[5, 6, 7]], device=DEV))
        assert probe.captures == 2 and probe.stats is not None


def test_auto_falls_back_and_on_refuses(monkeypatch):
    model = tiny_lm("llama", seed=3).to(DEV)
    layer = find_decoder_layers(model)[-1]
    dim = layer.post_attention_layernorm.weight.shape[0]
    for bad, why in ((GemmaStyleNorm(dim).to(DEV), "variance_epsilon"), (ScaledNorm(dim).to(DEV), "differs")):
        layer.post_attention_layernorm = bad
        assert why in llama_rmsnorm_problem(bad)
        with pytest.raises(ValueError, match=f"cannot be fused.*{why}"):
            AngleProbe(model, fused=True)
        with AngleProbe(model, fused="auto") as probe, torch.no_grad():
            assert probe.fused is None and layer.post_attention_layernorm is bad
            model(input_ids=torch.tensor([[5, 6, 7, 8]], device=DEV))
            assert probe.captures == 1
    with pytest.raises(ValueError, match="fused: expected"):
        AngleProbe(model, fused="yes")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # a CPU model without the interpreter: the kernel cannot run
    model = tiny_lm("llama", seed=3)
    with pytest.raises(ValueError, match="runs on CUDA"):
        AngleProbe(model, fused=True)
    with AngleProbe(model, fused="auto") as probe:
        assert probe.fused is None
    from gainrl_kernels.patching import apply_fused_rmsnorms

    with pytest.raises(ValueError, match="model.layers.0.input_layernorm: the fused kernel runs on CUDA"):
        apply_fused_rmsnorms(model)
    assert not any(isinstance(m, FusedRMSNormAngle) for m in model.modules())  # nothing replaced


def test_apply_and_revert_public_api(models):
    model = models["qwen2"]
    b = batch_on_device("left", seed=5)
    ref = reference(hooked_activation(model, 0, b["kwargs"]), b["where"], b["seg"])
    layer = find_decoder_layers(model)[0]
    original = layer.post_attention_layernorm
    norm = apply_fused_rmsnorm_angle(model, layer=0)
    try:
        assert layer.post_attention_layernorm is norm and norm.weight is original.weight
        assert apply_fused_rmsnorm_angle(model, layer=0) is norm  # already fused: as it is
        norm.set_attention_mask(b["batch"]["attention_mask"], b["seg"])
        with torch.no_grad():
            model(**b["kwargs"])
        from gainrl_kernels import angle_concentration

        assert_metrics_close(angle_concentration(norm.stats), ref)
        user = (norm._segments, norm.stats)
        with AngleProbe(model, layer=0, fused=True) as probe:  # a probe on a norm fused by the user keeps it fused
            assert probe.fused is norm
            probe.set_batch(None)
            with torch.no_grad():
                model(input_ids=b["kwargs"]["input_ids"][:1, :4])
        assert layer.post_attention_layernorm is norm
        assert norm._segments is user[0] and norm.stats is user[1]  # and gives the user's segment info back
    finally:
        assert revert_fused_rmsnorm_angle(model, layer=0) is original
    assert layer.post_attention_layernorm is original
    assert revert_fused_rmsnorm_angle(model, layer=0) is original  # nothing to revert: the norm as it is


def test_fused_dtype_rule():
    """Statistics of a 16-bit input with a wider weight only under autocast to the input's dtype (the MLP rounds HF's
    wider y to the fused kernel's y there); the output dtype is HF's either way."""
    norm = FusedRMSNormAngle(4, device=DEV)
    cu = torch.tensor([0, 2], dtype=torch.int32, device=DEV)
    x16 = torch.randn(2, 4, device=DEV).to(torch.bfloat16)
    norm.set_segments(cu)
    assert norm(x16.float()).dtype == torch.float32  # fp32 x: HF's output is fp32 too
    with pytest.raises(ValueError, match="HF's norm returns torch.float32 here"):
        norm(x16)
    with torch.autocast(torch.device(DEV).type, dtype=torch.bfloat16):
        y = norm(x16)
    assert y.dtype == torch.float32 and norm.stats is not None
    norm.clear_segments()
    assert torch.equal(y, norm(x16).to(torch.bfloat16).float())  # HF's y, rounded as the MLP would


def test_bf16_model(models):
    """A bf16 model (weights and activations): the fused statistics are those of the hook, to bf16 rounding of y."""
    model = tiny_lm("llama", seed=11).to(DEV, torch.bfloat16)
    b = batch_on_device("left", seed=12)
    concs, logits = [], []
    for fused in (False, True):
        with AngleProbe(model, fused=fused) as probe, torch.no_grad():
            probe.set_batch(b["seg"], **b["batch"])
            logits.append(model(**b["kwargs"]).logits.float())
            concs.append(probe.metrics())
    for name in METRICS:
        torch.testing.assert_close(getattr(concs[1], name), getattr(concs[0], name), rtol=0, atol=5e-3,
                                   equal_nan=True)
    torch.testing.assert_close(logits[1], logits[0], rtol=0.02, atol=0.02)


def test_consecutive_tokens_and_padded_to_cu_seqlens():
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 1, 0], [0, 0, 1, 1]], device=DEV)
    assert consecutive_tokens(mask).tolist() == [True, True, True, False, True]
    assert consecutive_tokens(mask[:, :0]).tolist() == [True] * 5  # no columns: every row empty
    with pytest.raises(ValueError, match="attention_mask: row 3 has padding between tokens"):
        padded_to_cu_seqlens(mask)
    keep = torch.tensor([0, 1, 2, 4], device=DEV)
    cu, tok = padded_to_cu_seqlens(mask[keep])
    assert cu.tolist() == [0, 2, 6, 6, 8] and tok.tolist() == [1, 2, 4, 5, 6, 7, 14, 15]


def tiny_qwen3():
    """A random Qwen3ForCausalLM (per-head q / k RMSNorms on [N, L, H, head_dim]) like tiny_models.tiny_lm's."""
    import transformers

    torch.manual_seed(13)
    cfg = transformers.Qwen3Config(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   max_position_embeddings=512, pad_token_id=2, tie_word_embeddings=False)
    model = transformers.Qwen3ForCausalLM(cfg)
    model.set_attn_implementation("eager")
    return model.eval()


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_apply_fused_rmsnorms_whole_model(kind):
    """Every norm of the model on our kernels: the same outputs and gradients, the same state_dict; reverted."""
    from gainrl_kernels.patching import apply_fused_rmsnorms, revert_fused_rmsnorms

    b = batch_on_device("left", seed=14)
    results = []
    for patched in (False, True):
        model = (tiny_lm("llama", seed=15) if kind == "llama" else tiny_qwen3()).to(DEV).train()
        keys = list(model.state_dict())
        names = apply_fused_rmsnorms(model) if patched else []
        if patched:
            n_layers = len(find_decoder_layers(model))
            per_layer = 2 if kind == "llama" else 4  # input / post-attention norms (+ q_norm, k_norm)
            assert len(names) == per_layer * n_layers + 1 and "model.norm" in names
            assert all(isinstance(model.get_submodule(n), FusedRMSNormAngle) for n in names)
            assert list(model.state_dict()) == keys and apply_fused_rmsnorms(model) == []
            with AngleProbe(model, fused=True) as probe:  # the probe uses the norm already fused, keeps it
                assert probe.fused is model.get_submodule(names[-2])  # the last post-attention norm
            assert isinstance(find_decoder_layers(model)[-1].post_attention_layernorm, FusedRMSNormAngle)
        out = model(**b["kwargs"], labels=b["kwargs"]["input_ids"])
        out.loss.backward()
        results.append((out.logits.detach(), [p.grad.clone() for p in model.parameters()]))
        if patched:
            assert sorted(revert_fused_rmsnorms(model)) == sorted(names)
            assert not any(isinstance(m, FusedRMSNormAngle) for m in model.modules())
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    for a, c in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-6)


def test_revert_keeps_a_replaced_weight():
    """A weight Parameter replaced while patched (e.g. by a conversion that swaps parameters) goes back with the
    original module, not the one it had before."""
    from gainrl_kernels.patching import apply_fused_rmsnorms, revert_fused_rmsnorms

    model = tiny_lm("llama", seed=16).to(DEV)
    apply_fused_rmsnorms(model)
    fused = model.model.norm
    fused.weight = nn.Parameter(fused.weight.detach() * 2)
    assert "model.norm" in revert_fused_rmsnorms(model)
    assert model.model.norm is not fused and model.model.norm.weight is fused.weight


def test_checkpoint_recompute_of_an_unmeasured_forward():
    """Gradient checkpointing recomputes in backward, after set_batch may have described another batch (here a
    forward under disabled(), as the trainer's later GRPO iterations): the recomputation runs the plain norm, and the
    gradients are those of the hook path."""
    ids_a = torch.randint(3, 400, (2, 6), generator=torch.Generator().manual_seed(0)).to(DEV)
    ids_b = torch.randint(3, 400, (3, 6), generator=torch.Generator().manual_seed(1)).to(DEV)
    grads = []
    for fused in (False, True):
        model = tiny_lm("llama", seed=7).to(DEV).train()
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        with AngleProbe(model, fused=fused) as probe:
            probe.set_batch(None, attention_mask=torch.ones(2, 6, dtype=torch.long, device=DEV))
            with torch.no_grad():
                model(input_ids=ids_a)
            with probe.disabled():
                out = model(input_ids=ids_b, labels=ids_b, use_cache=False)
            out.loss.backward()
            assert probe.captures == 1
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, c in zip(*grads):
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-6)


def test_peft_wrapped_norms():
    """PEFT's ModulesToSaveWrapper forwards `weight` and `forward` to the norm it wraps: the wrapper itself is refused
    (the probe's "auto" falls back to the hook), the norms inside it are replaced, and everything reverts."""
    peft = pytest.importorskip("peft")
    from gainrl_kernels.patching import apply_fused_rmsnorms, revert_fused_rmsnorms

    config = peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["norm", "post_attention_layernorm"])
    model = peft.get_peft_model(tiny_lm("llama", seed=17), config).to(DEV)
    ids = torch.tensor([[5, 6, 7, 8, 9]], device=DEV)
    with torch.no_grad():
        want = model(input_ids=ids).logits
    keys = list(model.state_dict())
    wrapper = find_decoder_layers(model)[-1].post_attention_layernorm
    assert "wrapper" in llama_rmsnorm_problem(wrapper)
    with pytest.raises(ValueError, match="wrapper"):
        AngleProbe(model, fused=True)
    with AngleProbe(model, fused="auto") as probe:
        assert probe.fused is None
    names = apply_fused_rmsnorms(model)
    assert "base_model.model.model.norm.modules_to_save.default" in names
    assert not any(n.endswith(("model.norm", "post_attention_layernorm")) for n in names)
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    assert sorted(revert_fused_rmsnorms(model)) == sorted(names)
    assert not any(isinstance(m, FusedRMSNormAngle) for m in model.modules())


def test_norm_failing_on_a_trial_input_is_refused():
    class Failing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(8))
            self.variance_epsilon = 1e-6

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("sharded")

    assert "failed on a random [3, 8] input (RuntimeError: sharded)" in llama_rmsnorm_problem(Failing())
