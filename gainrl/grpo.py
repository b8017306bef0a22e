"""GRPO objective as pure tensor functions (no model, no I/O): advantages, clipped policy loss, k3 KL.

Notation for one optimiser step: ``B = b·G`` rollouts (``b`` prompts, ``G`` generations each, the rollouts of a
prompt contiguous), response tokens ``t`` with mask ``m_{i,t} ∈ {0, 1}``.

* **Advantages** (:func:`group_advantages`): ``A_i = (r_i − mean_g r) / (std_g r + ε_std)`` with
  ``scale_rewards="group"`` (GRPO; ``std`` is the unbiased sample standard deviation of the group, as in TRL), or
  ``A_i = r_i − mean_g r`` with ``"none"`` (Dr. GRPO). A group whose rewards are all equal has zero advantages.
* **Policy loss** (:func:`policy_loss`): with ``ρ = exp(logp − logp_old)``,
  ``ℓ_{i,t} = −min(ρ A_i, clip(ρ, 1 − ε_low, 1 + ε_high) A_i) + β · k3_{i,t}``, ``ε_high = ε_low`` unless given
  (DAPO's "clip higher").
* **KL** (:func:`kl_k3`): Schulman's k3 estimator of ``KL(π_θ ‖ π_ref)`` per token,
  ``k3 = exp(logp_ref − logp) − (logp_ref − logp) − 1 ≥ 0`` (verl's ``low_var_kl`` without its clamp).
* **Aggregation**: ``"token"`` = ``Σ_{i,t} m ℓ / Σ_{i,t} m`` (DAPO / Dr. GRPO token-level mean), ``"sequence"`` =
  ``mean_i (Σ_t m ℓ / Σ_t m)`` (the original GRPO per-sequence mean). With gradient accumulation the
  denominators must be those of the whole optimiser step, so :func:`policy_loss` takes them as ``num_tokens`` /
  ``num_seqs``: the micro-batch losses then simply add up to the full-batch loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

ScaleRewards = Literal["group", "none"]
Aggregation = Literal["token", "sequence"]

SCALE_REWARDS: tuple[str, ...] = ("group", "none")
AGGREGATIONS: tuple[str, ...] = ("token", "sequence")


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale_rewards: ScaleRewards = "group", eps: float = 1e-4
) -> torch.Tensor:
    """Group-normalised advantages.

    Args:
        rewards: ``[b·G]`` rewards, each prompt's ``G`` rollouts contiguous (or ``[b, G]``).
        group_size: ``G`` (``>= 1``).
        scale_rewards: ``"group"`` divides by the group's standard deviation (+ ``eps``), ``"none"`` only centres.
        eps: added to the standard deviation.

    Returns:
        float32 advantages with the shape of ``rewards``. ``G = 1`` gives zeros (no baseline to compare with).
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of group_size={group_size}")
    r = rewards.reshape(-1, group_size).to(torch.float32)
    centred = r - r.mean(dim=1, keepdim=True)
    if scale_rewards == "group":
        std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])
        centred = torch.where(std > 0, centred / (std + eps), torch.zeros_like(centred))
    return centred.reshape(rewards.shape)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of ``KL(π ‖ π_ref)``: ``exp(ref − logp) − (ref − logp) − 1`` (``≥ 0``, 0 when equal).

    Unbiased for the KL when the tokens are sampled from ``π``; gradients flow through ``logp`` only if it
    requires them.
    """
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1.0


@dataclass
class LossStats:
    """Detached per-call statistics of :func:`policy_loss` (sums over unmasked tokens, so that micro-batches add).

    ``kl_sum``: Σ m·k3 (0 without a reference); ``clipped_sum``: Σ m·[the clipped term was active];
    ``ratio_sum``: Σ m·ρ; ``tokens``: Σ m.
    """

    kl_sum: torch.Tensor
    clipped_sum: torch.Tensor
    ratio_sum: torch.Tensor
    tokens: torch.Tensor


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    agg: Aggregation = "token",
    num_tokens: float | torch.Tensor | None = None,
    num_seqs: float | None = None,
) -> torch.Tensor:
    """Reduce a ``[B, T]`` per-token loss with ``mask`` (see the module docstring).

    ``num_tokens`` / ``num_seqs`` default to this call's own counts; pass the whole step's counts when the batch
    is one micro-batch of several.
    """
    if agg not in AGGREGATIONS:
        raise ValueError(f"agg must be one of {AGGREGATIONS}, got {agg!r}")
    mask = mask.to(per_token.dtype)
    # where, not a product: a non-finite value at a padded position would give inf * 0 = NaN
    masked = torch.where(mask != 0, per_token * mask, torch.zeros_like(per_token))
    if agg == "token":
        denom = mask.sum() if num_tokens is None else num_tokens
        return masked.sum() / torch.clamp(torch.as_tensor(denom, dtype=per_token.dtype), min=1.0)
    lengths = mask.sum(dim=1).clamp(min=1.0)
    per_seq = masked.sum(dim=1) / lengths
    denom = per_token.shape[0] if num_seqs is None else num_seqs
    return per_seq.sum() / max(float(denom), 1.0)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    beta: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    agg: Aggregation = "token",
    num_tokens: float | torch.Tensor | None = None,
    num_seqs: float | None = None,
) -> tuple[torch.Tensor, LossStats]:
    """Clipped-ratio GRPO loss (to minimise) of a ``[B, T]`` batch of response tokens.

    Args:
        logp: ``[B, T]`` log-probabilities of the sampled tokens under the current policy (with grad).
        old_logp: ``[B, T]`` the same under the policy that sampled them (detached; equal to ``logp`` for the
            first update on a batch, so that ``ρ = 1``).
        advantages: ``[B]`` per-rollout advantages.
        mask: ``[B, T]`` 1 for response tokens, 0 for padding.
        eps_low, eps_high: clip range ``[1 − eps_low, 1 + eps_high]`` (``eps_high`` defaults to ``eps_low``).
        beta: KL coefficient; with ``beta > 0`` ``ref_logp`` is required.
        ref_logp: ``[B, T]`` reference-policy log-probabilities (also used for the KL statistic when ``beta == 0``).
        agg, num_tokens, num_seqs: see :func:`aggregate`.

    Returns:
        ``(loss, stats)``. Padded positions (mask 0) contribute nothing, whatever their log-probabilities: not even
        a NaN gradient from an overflowing ``exp``.
    """
    if logp.shape != old_logp.shape or logp.shape != mask.shape:
        raise ValueError(f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)}, mask {tuple(mask.shape)} differ")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages must be [B={logp.shape[0]}], got {tuple(advantages.shape)}")
    if eps_low < 0 or (eps_high is not None and eps_high < 0):
        raise ValueError(f"clip ranges must be >= 0, got eps_low={eps_low}, eps_high={eps_high}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp")
    eps_high = eps_low if eps_high is None else eps_high
    adv = advantages.to(logp.dtype).unsqueeze(1)
    real = mask != 0
    zero = torch.zeros_like(logp)
    # padded positions enter every exp as 0 (ratio 1, k3 0): masking the result alone would leave inf * 0 = NaN in
    # the forward (padding's log-probs can be -100 and below) and NaN gradients through the exp
    logp_real = torch.where(real, logp, zero)
    ratio = torch.exp(logp_real - torch.where(real, old_logp.detach(), zero))
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    maskf = mask.to(logp.dtype)
    if ref_logp is not None:
        kl = kl_k3(logp_real, torch.where(real, ref_logp.detach(), zero))
        if beta > 0:
            per_token = per_token + beta * kl
        kl_sum = (kl.detach() * maskf).sum()
    else:
        kl_sum = torch.zeros((), dtype=logp.dtype, device=logp.device)
    loss = aggregate(per_token, mask, agg, num_tokens, num_seqs)
    with torch.no_grad():
        stats = LossStats(
            kl_sum=kl_sum,
            clipped_sum=((clipped < unclipped).to(logp.dtype) * maskf).sum(),
            ratio_sum=(ratio.detach() * maskf).sum(),
            tokens=maskf.sum(),
        )
    return loss, stats


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log softmax(logits / temperature)`` at ``tokens``: ``[B, T, V]``, ``[B, T]`` -> ``[B, T]`` float32.

    Computed row by row so that only one ``[T, V]`` float32 copy of the logits lives at a time.
    """
    if logits.shape[:2] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)} do not match")
    out = []
    for row_logits, row_tokens in zip(logits, tokens):
        row = row_logits.float()
        if temperature != 1.0:
            row = row / temperature
        out.append(torch.log_softmax(row, dim=-1).gather(-1, row_tokens.unsqueeze(-1)).squeeze(-1))
    return torch.stack(out)


__all__ = [
    "AGGREGATIONS",
    "SCALE_REWARDS",
    "LossStats",
    "aggregate",
    "group_advantages",
    "kl_k3",
    "policy_loss",
    "token_logprobs",
]
