"""gainrl.grpo against hand-computed values: advantages, k3 KL, clipped loss, aggregation, micro-batch additivity."""
from __future__ import annotations

import math

import pytest
import torch

from gainrl.grpo import aggregate, group_advantages, kl_k3, policy_loss, token_logprobs


def test_group_advantages_group_scaling_by_hand():
    # group 1: rewards 0, 1, 1, 0 -> mean 0.5, unbiased std sqrt(1/3)
    # group 2: all equal -> zero advantages
    r = torch.tensor([0.0, 1.0, 1.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(r, 4, "group", eps=0.0)
    s = math.sqrt(1 / 3)
    expect = [-0.5 / s, 0.5 / s, 0.5 / s, -0.5 / s, 0, 0, 0, 0]
    assert adv.tolist() == pytest.approx(expect, abs=1e-6)


def test_group_advantages_eps_and_none():
    r = torch.tensor([1.0, 3.0])  # mean 2, unbiased std sqrt(2)
    assert group_advantages(r, 2, "group", eps=1e-4).tolist() == pytest.approx(
        [-1 / (math.sqrt(2) + 1e-4), 1 / (math.sqrt(2) + 1e-4)], rel=1e-6
    )
    assert group_advantages(r, 2, "none").tolist() == [-1.0, 1.0]
    assert group_advantages(r.reshape(1, 2), 2, "none").shape == (1, 2)
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(r, 2, "batch")
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(3), 2)


def test_kl_k3_by_hand():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.0, -1.0, -1.5])
    # k3 = exp(d) - d - 1 with d = ref - logp = [0, 1, -1]
    expect = [0.0, math.e - 2.0, math.exp(-1) + 1 - 1]
    assert kl_k3(logp, ref).tolist() == pytest.approx(expect, abs=1e-6)
    assert (kl_k3(torch.randn(100), torch.randn(100)) >= 0).all()


def test_k3_is_an_unbiased_kl_estimate():
    # tokens sampled from p: E_p[k3] = KL(p || q)
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.5, 0.3])
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    est = kl_k3(p.log()[x], q.log()[x]).mean().item()
    exact = float((p * (p / q).log()).sum())
    assert est == pytest.approx(exact, rel=0.02)


def hand_example():
    """Two sequences, three token slots; sequence 2 has 2 real tokens."""
    logp = torch.tensor([[-1.0, -0.5, -2.0], [-0.2, -1.5, -9.0]], requires_grad=True)
    old = torch.tensor([[-1.2, -0.5, -1.0], [-0.2, -1.0, -9.0]])
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    return logp, old, adv, mask


def test_policy_loss_token_level_by_hand():
    logp, old, adv, mask = hand_example()
    loss, st = policy_loss(logp, old, adv, mask, eps_low=0.2, agg="token")
    # ratios: seq1 [e^0.2, 1, e^-1], seq2 [1, e^-0.5, (masked)]
    r = [[math.exp(0.2), 1.0, math.exp(-1.0)], [1.0, math.exp(-0.5)]]
    # seq1 (A=+1): -min(r, clip(r, 0.8, 1.2)) = [-1.2, -1, -e^-1]   (1.2214 clipped to 1.2)
    # seq2 (A=-2): -min(-2r, -2 clip(r)) = 2*max(r, clip(r)) = [2, 2*0.8]  (e^-0.5=0.6065 -> clip 0.8 is larger)
    per_token = [-1.2, -1.0, -math.exp(-1.0), 2.0, 1.6]
    assert loss.item() == pytest.approx(sum(per_token) / 5, abs=1e-6)
    assert st.tokens.item() == 5
    assert st.clipped_sum.item() == 2  # seq1 token 0 and seq2 token 1: the clipped term is the active one
    assert st.ratio_sum.item() == pytest.approx(sum(r[0]) + sum(r[1]), abs=1e-6)
    assert st.kl_sum.item() == 0.0
    loss.backward()
    # gradient: unclipped tokens carry -A * r / N_tokens, clipped ones 0
    g = logp.grad
    assert g[0].tolist() == pytest.approx([0.0, -1.0 / 5, -math.exp(-1.0) / 5], abs=1e-6)
    assert g[1].tolist() == pytest.approx([2.0 / 5, 0.0, 0.0], abs=1e-6)


def test_policy_loss_sequence_level_and_eps_high():
    logp, old, adv, mask = hand_example()
    loss, _ = policy_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.3, agg="sequence")
    # eps_high = 0.3: seq1 token 0 ratio 1.2214 < 1.3 is not clipped any more
    seq1 = (-math.exp(0.2) - 1.0 - math.exp(-1.0)) / 3
    seq2 = (2.0 + 1.6) / 2
    assert loss.item() == pytest.approx((seq1 + seq2) / 2, abs=1e-6)


def test_policy_loss_with_kl_by_hand():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.0, -1.0]])
    mask = torch.ones(1, 2)
    loss, st = policy_loss(logp, logp.detach(), torch.tensor([0.5]), mask, beta=0.1, ref_logp=ref)
    # on-policy ratio 1: -A per token; KL k3 = [0, e - 2]
    expect = (-0.5 - 0.5 + 0.1 * (0.0 + math.e - 2.0)) / 2
    assert loss.item() == pytest.approx(expect, abs=1e-6)
    assert st.kl_sum.item() == pytest.approx(math.e - 2.0, abs=1e-6)
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(logp, logp.detach(), torch.tensor([0.5]), mask, beta=0.1)


def test_micro_batches_add_up_to_the_full_batch():
    g = torch.Generator().manual_seed(1)
    logp = torch.randn(6, 5, generator=g)
    old = logp + 0.1 * torch.randn(6, 5, generator=g)
    adv = torch.randn(6, generator=g)
    mask = (torch.rand(6, 5, generator=g) > 0.3).float()
    mask[:, 0] = 1
    for agg in ("token", "sequence"):
        full, _ = policy_loss(logp, old, adv, mask, agg=agg)
        parts = sum(
            policy_loss(logp[s:e], old[s:e], adv[s:e], mask[s:e], agg=agg, num_tokens=mask.sum(), num_seqs=6)[0]
            for s, e in ((0, 2), (2, 5), (5, 6))
        )
        assert parts.item() == pytest.approx(full.item(), abs=1e-6)


def test_aggregate_validation_and_token_logprobs():
    with pytest.raises(ValueError, match="agg"):
        aggregate(torch.zeros(1, 1), torch.ones(1, 1), "mean")
    logits = torch.randn(2, 3, 7)
    tokens = torch.randint(0, 7, (2, 3))
    expect = torch.log_softmax(logits / 0.5, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(token_logprobs(logits, tokens, 0.5), expect, atol=1e-6)


@pytest.mark.parametrize("agg", ["token", "sequence"])
def test_padded_positions_with_overflowing_exp_contribute_nothing(agg):
    # padded slot of row 0: logp -120 vs ref -5 (k3's exp(ref - logp) = exp(115) overflows float32) and old -300
    # (ratio exp(180) overflows); row 1's padded slot holds a NaN log-prob
    logp = torch.tensor([[-1.0, -0.5, -120.0], [-0.3, -2.0, float("nan")]], requires_grad=True)
    old = torch.tensor([[-1.1, -0.5, -300.0], [-0.3, -1.5, -1.0]])
    ref = torch.tensor([[-1.2, -0.7, -5.0], [-0.1, -2.5, -1.0]])
    adv = torch.tensor([1.0, -0.5])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    kw = dict(beta=0.1, agg=agg, eps_low=0.2)
    loss, st = policy_loss(logp, old, adv, mask, ref_logp=ref, **kw)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert logp.grad[:, 2].tolist() == [0.0, 0.0]
    assert math.isfinite(st.kl_sum.item()) and math.isfinite(st.ratio_sum.item())
    short = logp.detach()[:, :2].clone().requires_grad_(True)  # the same batch without the padded column
    expect, st2 = policy_loss(short, old[:, :2], adv, mask[:, :2], ref_logp=ref[:, :2], **kw)
    expect.backward()
    assert loss.item() == pytest.approx(expect.item(), abs=1e-6)
    assert torch.allclose(logp.grad[:, :2], short.grad, atol=1e-7)
    assert st.kl_sum.item() == pytest.approx(st2.kl_sum.item(), abs=1e-6)
    assert st.ratio_sum.item() == pytest.approx(st2.ratio_sum.item(), abs=1e-6)
    assert aggregate(torch.tensor([[1.0, float("inf")]]), torch.tensor([[1.0, 0.0]]), agg).item() == 1.0
