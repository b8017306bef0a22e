"""Angle probe: per-sequence angle statistics computed *inside* a Hugging Face decoder's forward pass.

The probe hooks the chosen decoder layer's MLP (``layers[layer].mlp``, a forward pre-hook): its input is the input of
``mlp.up_proj`` (DESIGN.md §1: the output of ``post_attention_layernorm`` in Llama / Qwen2 / Qwen3 / Mistral /
SmolLM layers; of ``pre_feedforward_layernorm`` in Gemma-2/3 layers, whose ``post_attention_layernorm`` normalises
the attention output instead). The hook packs the real (non-pad) tokens and runs :func:`gainrl_kernels.angle_stats`
on them; only the statistics are kept, never the activation, and nothing syncs with the host.

Usage::

    with AngleProbe(model, layer=-1) as probe:
        probe.set_batch(seg_offsets, attention_mask=attention_mask)   # [B, K+1] int32, relative to the first real token
        out = model(input_ids, attention_mask=attention_mask)         # training forward: autograd, checkpointing OK
        conc = probe.metrics()                                         # AngleConcentration of that forward

    stats = probe_forward(model, input_ids, attention_mask, seg_offsets)   # scoring: stops after the target layer

Batch layouts (``set_batch``):

* padded ``[N, L]`` batches, left or right padding: pass ``attention_mask``;
* packed ``[1, T]`` batches: pass ``cu_seqlens`` ``[B+1]`` or ``position_ids`` restarting at 0 per sequence;
* nothing: each row of the batch is one whole sequence (no padding).

``seg_offsets=None`` means one segment per sequence (``[[0, len_b]]``).

``fused=True`` (or ``"auto"``: where it applies) measures without that extra read: the layer's MLP-input norm
(``post_attention_layernorm``; Gemma: ``pre_feedforward_layernorm``) is replaced, while the probe is attached, by the
fused RMSNorm + angle kernel (:func:`gainrl_kernels.patching.apply_fused_rmsnorm_angle`, same weight Parameter),
which computes the norm and the statistics of its output in one pass. It needs an HF LlamaRMSNorm-style norm and a
device the kernel runs on (CUDA; CPU only under ``TRITON_INTERPRET=1``). Padded batches must be left or right
padded: a row with padding between its tokens gets NaN statistics (the hook path takes any mask).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .api import angle_concentration, angle_stats, whole_sequence_offsets
from .types import AngleConcentration, AngleStats


class EarlyExit(Exception):
    """Raised by an early-exit probe once the target layer's MLP input has been measured; carries the statistics.

    :meth:`AngleProbe.run` and :func:`probe_forward` catch it; call ``model(...)`` yourself only inside
    ``try: ... except EarlyExit``.
    """

    def __init__(self, stats: AngleStats) -> None:
        super().__init__("angle probe early exit")
        self.stats = stats


# --------------------------------------------------------------------------------------------------------------
# Finding the layers
# --------------------------------------------------------------------------------------------------------------


def _is_decoder_layer(module: nn.Module) -> bool:
    return hasattr(module, "mlp") or hasattr(module, "self_attn")


def _layer_problem(layer: nn.Module) -> str | None:
    if not hasattr(layer, "post_attention_layernorm"):
        return "has no `post_attention_layernorm`"
    mlp = getattr(layer, "mlp", None)
    if mlp is None:
        return "has no `mlp`"
    if not hasattr(mlp, "up_proj"):
        return f"has an `mlp` ({type(mlp).__name__}) without `up_proj` (fused or mixture-of-experts MLP?)"
    return None


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Hugging Face causal LM (Llama, Qwen2/2.5/3, Mistral, SmolLM, Gemma-style…), also
    inside PEFT or other wrappers: the first ``nn.ModuleList`` (in ``named_modules`` order) whose elements are
    decoder layers with ``post_attention_layernorm`` and ``mlp.up_proj``.

    Raises:
        ValueError: no decoder-layer list was found, or its layers lack ``post_attention_layernorm`` /
            ``mlp.up_proj`` (the message names the layer class and what is missing).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    problems = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if not all(_is_decoder_layer(layer) for layer in module):
            continue
        problem = next((p for p in map(_layer_problem, module) if p), None)
        if problem is None:
            return module
        problems.append(f"{name or '<root>'} ({type(module[0]).__name__}) {problem}")
    if problems:
        raise ValueError(
            "the angle probe needs decoder layers with `post_attention_layernorm` and `mlp.up_proj`: "
            + "; ".join(problems)
        )
    raise ValueError(
        f"no decoder layers found in {type(model).__name__}: expected an nn.ModuleList of layers with "
        "`self_attn` / `mlp` (e.g. model.model.layers)"
    )


def resolve_layer(layers: nn.ModuleList, layer: int) -> int:
    """``layer`` as a non-negative index into ``layers`` (negative counts from the end)."""
    n = len(layers)
    if not isinstance(layer, int) or isinstance(layer, bool) or not -n <= layer < n:
        raise ValueError(f"layer: expected an integer in [{-n}, {n - 1}] ({n} decoder layers), got {layer!r}")
    return layer % n


# --------------------------------------------------------------------------------------------------------------
# Batch layouts -> packed tokens
# --------------------------------------------------------------------------------------------------------------


def padded_pack_index(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For a padded ``[N, L]`` mask: ``(perm [N*L] int64, cu_seqlens [N+1] int32)``, all on the mask's device, no
    host sync. ``flat_hidden.index_select(0, perm)`` puts the real tokens of every row first, packed in row order
    (pads after ``cu_seqlens[-1]``, where they take part in nothing). Any mask works, left or right padded."""
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask: expected a 2-D [N, L] mask, got shape {tuple(attention_mask.shape)}")
    real = attention_mask.reshape(-1) != 0
    n_flat = real.numel()
    in_real = torch.cumsum(real, 0)  # int64
    in_pad = torch.cumsum(~real, 0)
    total = in_real[-1:] if n_flat else in_real.new_zeros(1)
    dest = torch.where(real, in_real - 1, total + in_pad - 1)
    perm = torch.empty_like(dest).scatter_(0, dest, torch.arange(n_flat, device=dest.device))
    cu = torch.zeros(attention_mask.shape[0] + 1, dtype=torch.int32, device=attention_mask.device)
    cu[1:] = torch.cumsum((attention_mask != 0).sum(1), 0)
    return perm, cu


def cu_seqlens_from_position_ids(position_ids: torch.Tensor, n_seq: int) -> torch.Tensor:
    """``[B+1]`` int32 cu_seqlens of a packed batch whose ``position_ids`` (flattened) restart at 0 for each of its
    ``n_seq`` sequences, on device, no host sync. The first token must have position 0; tokens from the
    ``n_seq+1``-th start on (e.g. trailing padding that restarts at 0) are left outside every sequence."""
    pos = position_ids.reshape(-1)
    seq = torch.cumsum(pos == 0, 0) - 1  # sequence id per token
    valid = (seq >= 0) & (seq < n_seq)
    lens = torch.zeros(n_seq + 1, dtype=torch.int64, device=pos.device)
    lens.index_add_(0, torch.where(valid, seq, torch.full_like(seq, n_seq)), torch.ones_like(seq))
    cu = torch.zeros(n_seq + 1, dtype=torch.int32, device=pos.device)
    cu[1:] = torch.cumsum(lens[:n_seq], 0)
    return cu


def _nan_rows(stats: AngleStats, rows: torch.Tensor) -> AngleStats:
    """``stats`` with NaN sums for the sequences where ``rows`` [B] bool is set (count unchanged)."""
    nan = float("nan")
    return AngleStats(stats.unit_sum.masked_fill(rows[:, None, None], nan), stats.count,
                      stats.sq_norm.masked_fill(rows[:, None], nan), stats.adjacent.masked_fill(rows, nan))


def _recomputing() -> bool:
    """Backward is running: a forward now is a gradient-checkpointing recomputation, not a real forward."""
    return torch._C._current_graph_task_id() != -1


def _first_tensor(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))


@dataclass
class _Batch:
    """Where the real tokens of the next forward are: ``cu_seqlens`` over the flattened (or permuted) tokens."""

    seg_offsets: torch.Tensor | None  # [B, K+1] int32 or None (whole sequences)
    cu_seqlens: torch.Tensor | None  # [B+1] int32 or None (every row of the batch is one sequence)
    perm: torch.Tensor | None  # [N*L] int64 for padded batches
    shape: tuple[int, int] | None  # (N, L) expected of the hidden states, or None (packed: any)
    contiguous: torch.Tensor | None = None  # [N] bool, fused probes of padded batches: the row's tokens are consecutive


# --------------------------------------------------------------------------------------------------------------
# The probe
# --------------------------------------------------------------------------------------------------------------


class AngleProbe:
    """Angle statistics of one decoder layer's MLP input, measured during ``model``'s forward passes.

    Args:
        model: a Hugging Face decoder LM (or any wrapper of one, e.g. PEFT), see :func:`find_decoder_layers`.
        layer: decoder layer index, negative counts from the end (default: the last layer).
        early_exit: after measuring, stop the forward by raising :class:`EarlyExit` (no later layers, final
            norm, ``lm_head`` or logits); use :meth:`run` or :func:`probe_forward`.
        backend: ``angle_stats`` backend ("auto", "triton", "cuda", "torch").
        device: where the batch description lives (it must be the activations' device); default: that of the probed
            MLP's parameters. Set it (also later, as the attribute) when the MLP owns none, e.g. FSDP1 flat params.
        fused: ``True`` / ``"on"``: measure with the fused RMSNorm + angle kernel in place of the layer's MLP-input
            norm (see the module docstring; ``backend`` is then unused), ValueError where it cannot; ``"auto"``: that
            where it can (an HF LlamaRMSNorm-style norm on CUDA), else the hook; ``False`` / ``"off"`` (default):
            ``angle_stats`` on the MLP input from a forward pre-hook.

    Attributes:
        stats: :class:`AngleStats` of the last real forward (a gradient-checkpointing recomputation in backward
            does not count), or ``None`` before the first one / after :meth:`set_batch`.
        captures: number of forwards measured so far.
        layer_index: the resolved (non-negative) layer index.
        fused: the fused norm module while the probe uses one, else ``None``.
    """

    def __init__(self, model: nn.Module, layer: int = -1, early_exit: bool = False, backend: str = "auto",
                 device: torch.device | str | None = None, fused: bool | str = False) -> None:
        self.model = model
        self.device = torch.device(device) if device is not None else None
        layers = find_decoder_layers(model)
        self.layer_index = resolve_layer(layers, layer)
        self.module = layers[self.layer_index].mlp
        self.early_exit = bool(early_exit)
        self.backend = backend
        self.enabled = True
        self.stats: AngleStats | None = None
        self.captures = 0
        self._batch: _Batch | None = None
        self._norm_out: torch.Tensor | None = None  # fused: the norm's output of the forward being measured
        self._keep_fused = False  # fused: the norm was already fused before the probe (not reverted by remove())
        self._user_segments: tuple[Any, Any] = (None, None)  # ... and the segments / stats its user had set
        self.fused = self._fuse(layers[self.layer_index], fused)
        if self.fused is None:
            self._handles = [self.module.register_forward_pre_hook(self._hook, with_kwargs=True)]
        else:
            self._handles = [
                self.fused.register_forward_pre_hook(self._norm_pre_hook),
                self.fused.register_forward_hook(self._norm_post_hook),
                self.module.register_forward_pre_hook(self._mlp_input_check, with_kwargs=True),
            ]

    def _fuse(self, layer: nn.Module, fused: bool | str) -> nn.Module | None:
        """The fused norm put in place of ``layer``'s MLP-input norm, or None (hook path); see ``fused``."""
        if fused is False or fused == "off":
            return None
        if fused not in (True, "on", "auto"):
            raise ValueError(f"fused: expected False, True, 'off', 'on' or 'auto', got {fused!r}")
        from .patching import apply_fused_rmsnorm_angle, mlp_input_norm_name
        from .rmsnorm_angle import FusedRMSNormAngle
        from .validate import triton_runs_on

        try:
            name = mlp_input_norm_name(layer)
            norm = getattr(layer, name)
            param = next(norm.parameters(), None)
            if param is not None and not triton_runs_on(param.device):
                raise ValueError(f"the fused kernel runs on CUDA (on CPU only under TRITON_INTERPRET=1); `{name}` "
                                 f"is on {param.device}")
            self._keep_fused = isinstance(norm, FusedRMSNormAngle)
            if self._keep_fused:  # the user's own segment info, put back by remove()
                self._user_segments = (norm._segments, norm.stats)
            return apply_fused_rmsnorm_angle(self.model, self.layer_index)
        except ValueError as e:
            if fused == "auto":
                return None
            raise ValueError(f"fused: decoder layer {self.layer_index}: {e}") from None

    # -- batch description ------------------------------------------------------------------------------------

    def _device(self) -> torch.device:
        if self.device is not None:
            return self.device
        param = next(self.module.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    def set_batch(
        self,
        seg_offsets: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> None:
        """Describe the next forward's batch (kept for the following forwards until the next call).

        Args:
            seg_offsets: ``[B, K+1]`` segment offsets relative to each sequence's first real token, or ``None`` for
                one segment per whole sequence.
            attention_mask: ``[N, L]`` padding mask of a padded batch (left or right padding); ``B == N``.
            cu_seqlens: ``[B+1]`` boundaries of a packed batch over its flattened tokens.
            position_ids: of a packed batch, restarting at 0 per sequence (used when neither of the above is given;
                ``B`` is then ``seg_offsets.shape[0]``).
        """
        device = self._device()
        if seg_offsets is not None:
            seg_offsets = torch.as_tensor(seg_offsets)
            if seg_offsets.dim() != 2 or seg_offsets.shape[1] < 2:
                raise ValueError(f"seg_offsets: expected shape [B, K+1] with K >= 1, got {tuple(seg_offsets.shape)}")
            seg_offsets = seg_offsets.to(device=device, dtype=torch.int32)
        perm = shape = None
        contiguous = None
        if attention_mask is not None:
            mask = torch.as_tensor(attention_mask).to(device)
            perm, cu = padded_pack_index(mask)
            shape = (int(mask.shape[0]), int(mask.shape[1]))
            if self.fused is not None:
                from .rmsnorm_angle import consecutive_tokens

                contiguous = consecutive_tokens(mask)
        elif cu_seqlens is not None:
            cu = torch.as_tensor(cu_seqlens).to(device=device, dtype=torch.int32)
            if cu.dim() != 1 or cu.numel() < 1:
                raise ValueError(f"cu_seqlens: expected a 1-D [B+1] tensor, got shape {tuple(cu.shape)}")
        elif position_ids is not None:
            if seg_offsets is None:
                raise ValueError("position_ids: pass seg_offsets too (it gives the number of packed sequences)")
            cu = cu_seqlens_from_position_ids(torch.as_tensor(position_ids).to(device), seg_offsets.shape[0])
        else:
            cu = None
        if cu is not None and seg_offsets is not None and seg_offsets.shape[0] != cu.numel() - 1:
            raise ValueError(
                f"seg_offsets: {seg_offsets.shape[0]} rows for {cu.numel() - 1} sequences in the batch"
            )
        self._batch = _Batch(seg_offsets, cu, perm, shape, contiguous)
        self.stats = None
        self._norm_out = None  # a forward that failed between the norm and the MLP kept its activation

    # -- the hook ---------------------------------------------------------------------------------------------

    def _layout(self, hidden: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """``(perm, cu_seqlens, seg_offsets)`` of this forward's hidden states ``[N, L, D]`` (or ``[T, D]``):
        ``perm`` [N*L] int64 puts a padded batch's real tokens first (None: the flat rows are the packed tokens)."""
        if hidden.dim() == 2:
            hidden = hidden.unsqueeze(0)
        if hidden.dim() != 3:
            raise ValueError(
                f"angle probe: expected [N, L, D] hidden states at the MLP input, got {tuple(hidden.shape)}"
            )
        n_rows, length, _ = hidden.shape
        perm = None
        batch = self._batch
        if batch is None or batch.cu_seqlens is None:
            seg = batch.seg_offsets if batch is not None else None
            if seg is not None and seg.shape[0] != n_rows:
                raise ValueError(f"angle probe: seg_offsets has {seg.shape[0]} rows for a batch of {n_rows} rows")
            cu = torch.arange(n_rows + 1, device=hidden.device, dtype=torch.int32) * length
        else:
            if batch.shape is not None and (n_rows, length) != batch.shape:
                raise ValueError(
                    f"angle probe: set_batch described a {batch.shape[0]}x{batch.shape[1]} padded batch, the forward "
                    f"has {n_rows}x{length} (call set_batch for every batch; use `with probe.disabled():` around "
                    "forwards not to measure, e.g. generation)"
                )
            perm, cu, seg = batch.perm, batch.cu_seqlens, batch.seg_offsets
        if seg is None:
            seg = whole_sequence_offsets(cu)
        return perm, cu, seg

    def _pack(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(packed tokens [T, D], cu_seqlens, seg_offsets)`` for ``angle_stats``."""
        perm, cu, seg = self._layout(hidden)
        flat = hidden.reshape(-1, hidden.shape[-1])
        if perm is not None:
            flat = flat.index_select(0, perm)
        return flat, cu, seg

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if not self.enabled or _recomputing():
            return
        hidden = _first_tensor(args, kwargs)
        with torch.no_grad():
            flat, cu, seg = self._pack(hidden.detach())
            self.stats = angle_stats(flat, cu, seg, backend=self.backend, validate_values=False)
        self.captures += 1
        if self.early_exit:
            raise EarlyExit(self.stats)

    # fused: the norm computes y and the statistics (pre-hook: this forward's segments; forward hook: keep the
    # statistics); the MLP's pre-hook checks that its input is that y, and stops an early-exit forward

    def _norm_pre_hook(self, norm: nn.Module, args: tuple) -> None:
        hidden = args[0]
        if not self.enabled or _recomputing():
            # a plain RMSNorm: generation, or a gradient-checkpointing recomputation in backward, which may belong to
            # an earlier batch than the last set_batch (e.g. a forward under disabled()); from D = 1025 its y may
            # differ from the measured forward's by one rounding step now and then (rmsnorm_angle's module docstring)
            norm.clear_segments()
            return
        perm, cu, seg = self._layout(hidden)
        norm.set_segments(cu, seg, perm, validate=False)

    def _norm_post_hook(self, norm: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if not self.enabled or _recomputing():
            return  # a recomputation computes the same y (same kernel), its statistics are not kept
        stats = norm.stats
        if self._batch is not None and self._batch.contiguous is not None:
            stats = _nan_rows(stats, ~self._batch.contiguous)
        self.stats = stats
        self.captures += 1
        self._norm_out = output

    def _mlp_input_check(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if not self.enabled or _recomputing():
            return
        expected, self._norm_out = self._norm_out, None
        if _first_tensor(args, kwargs) is not expected:
            self.stats = None
            raise RuntimeError(
                f"angle probe (fused): the input of decoder layer {self.layer_index}'s MLP is not the output of its "
                "fused norm in this forward (something runs between them, or the norm did not run): use fused=False"
            )
        if self.early_exit:
            raise EarlyExit(self.stats)

    # -- results and helpers ----------------------------------------------------------------------------------

    def metrics(self, inter_weight: float = 1.0) -> AngleConcentration:
        """:func:`angle_concentration` of :attr:`stats` (intra, inter, score, causal, causal_ref)."""
        if self.stats is None:
            raise RuntimeError("angle probe: no forward has been measured since the last set_batch")
        return angle_concentration(self.stats, inter_weight)

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """``model(*args, **kwargs)`` with :class:`EarlyExit` caught: returns the model output, or ``None`` when the
        probe stopped the forward. The statistics are in :attr:`stats`."""
        try:
            return self.model(*args, **kwargs)
        except EarlyExit:
            return None

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Forwards inside this block are not measured (e.g. generation with a KV cache)."""
        saved, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = saved

    def remove(self) -> None:
        """Remove the hooks (and a fused norm the probe put in): the model is exactly as before the probe."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self.fused is not None:
            self.fused.clear_segments()
            if self._keep_fused:
                self.fused._segments, self.fused.stats = self._user_segments
            else:
                from .patching import revert_fused_rmsnorm_angle

                revert_fused_rmsnorm_angle(self.model, self.layer_index)
            self.fused = None

    def __enter__(self) -> AngleProbe:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def probe_forward(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    seg_offsets: torch.Tensor | None,
    layer: int = -1,
    backend: str = "auto",
    fused: bool | str = False,
    **model_kwargs: Any,
) -> AngleStats:
    """Angle statistics of ``layer``'s MLP input for a padded batch, stopping the forward right there (no later
    layers, no final norm, no ``lm_head``); runs under ``torch.inference_mode``. ``model_kwargs`` go to the model
    (e.g. ``position_ids``); ``use_cache`` defaults to False. ``fused``: as :class:`AngleProbe`'s."""
    model_kwargs.setdefault("use_cache", False)
    with AngleProbe(model, layer=layer, early_exit=True, backend=backend, fused=fused) as probe, \
            torch.inference_mode():
        probe.set_batch(seg_offsets, attention_mask=attention_mask)
        probe.run(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)
        if probe.stats is None:
            raise RuntimeError(f"angle probe: the forward never reached decoder layer {probe.layer_index}'s MLP")
        return probe.stats


__all__ = [
    "AngleProbe",
    "EarlyExit",
    "cu_seqlens_from_position_ids",
    "find_decoder_layers",
    "padded_pack_index",
    "probe_forward",
    "resolve_layer",
]
