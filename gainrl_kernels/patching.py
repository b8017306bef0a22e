"""Hugging Face model patching: our RMSNorm kernels in place of HF RMSNorm modules, with the angle statistics at the
probed layer's MLP-input norm.

The angle statistics are of the MLP input, which in Llama / Qwen2 / Qwen3 / Mistral / SmolLM layers is the output
of ``post_attention_layernorm`` (Gemma-2/3: ``pre_feedforward_layernorm``). Swapping that one module for
:class:`~gainrl_kernels.rmsnorm_angle.FusedRMSNormAngle` computes the norm and the statistics in one pass over the
activations, with no extra read::

    norm = apply_fused_rmsnorm_angle(model, layer=-1)     # the layer's norm, now fused (same weight Parameter)
    norm.set_attention_mask(attention_mask, seg_offsets)  # or norm.set_segments(cu_seqlens, seg_offsets)
    model(input_ids, attention_mask=attention_mask)
    norm.stats                                            # AngleStats of the MLP input
    revert_fused_rmsnorm_angle(model, layer=-1)           # the original module back

:class:`~gainrl_kernels.probe.AngleProbe` does this for you with ``fused=True`` (or ``"auto"``).
:func:`apply_fused_rmsnorms` replaces every such norm of a model (plain RMSNorms, our kernels forward and backward
instead of HF's eager formula), as Liger-Kernel's ``apply_*`` functions do. Only norms with HF
``LlamaRMSNorm``'s formula (``weight * (x * rsqrt(mean(x²) + eps)).to(x.dtype)``) are replaced: a module is checked
by its attributes (``weight`` [D], ``variance_epsilon``) and by one call on a small random input against that
formula; Gemma's ``(1 + weight)`` norms and other variants are refused with the reason. The fused kernel is Triton
(CUDA; on CPU only under ``TRITON_INTERPRET=1``) or the CUDA extension.
"""
from __future__ import annotations

import torch
from torch import nn

from .naive_rmsnorm_angle import rmsnorm_reference
from .rmsnorm_angle import FusedRMSNormAngle
from .validate import triton_runs_on

# decoder-layer attributes of the norm whose output is the MLP input, most specific first
MLP_INPUT_NORMS = ("pre_feedforward_layernorm", "post_attention_layernorm")


def mlp_input_norm_name(layer: nn.Module) -> str:
    """Name of ``layer``'s norm whose output feeds its MLP (``pre_feedforward_layernorm`` where the layer has one,
    as in Gemma-2/3, else ``post_attention_layernorm``). Raises ValueError when it has neither."""
    for name in MLP_INPUT_NORMS:
        if isinstance(getattr(layer, name, None), nn.Module):
            return name
    raise ValueError(f"{type(layer).__name__} has none of {MLP_INPUT_NORMS}: no norm to fuse")


def llama_rmsnorm_problem(module: nn.Module) -> str | None:
    """Why ``module`` cannot be replaced by the fused kernel (None: it can). It must have a 1-D floating ``weight``
    Parameter and a float ``variance_epsilon``, and give HF LlamaRMSNorm's output on a random [3, D] input of the
    weight's dtype (within two steps of that dtype: the rsqrt may differ in its last bit)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter) or weight.dim() != 1 or not weight.is_floating_point():
        return f"{type(module).__name__} has no 1-D floating `weight` Parameter"
    if module._parameters.get("weight") is not weight or next(module.children(), None) is not None:
        # e.g. PEFT's ModulesToSaveWrapper, which forwards `weight` and `forward` to the module it wraps (that one
        # can be replaced inside the wrapper)
        return f"{type(module).__name__} is a wrapper (it has submodules, or its `weight` is not its own Parameter)"
    if weight.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"{type(module).__name__}.weight has dtype {weight.dtype} (the kernel takes fp16, bf16, fp32)"
    eps = getattr(module, "variance_epsilon", None)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        return (f"{type(module).__name__} has no float `variance_epsilon` (not an HF LlamaRMSNorm-style norm: "
                "Gemma-style norms scale by 1 + weight)")
    if weight.device.type == "meta":
        return None  # nothing to run: the attributes have to do
    gen = torch.Generator(device=weight.device).manual_seed(0)
    x = torch.randn(3, weight.shape[0], generator=gen, device=weight.device).mul_(3).to(weight.dtype)
    try:
        with torch.no_grad():
            got = module(x)
            want = rmsnorm_reference(x, weight, float(eps))  # HF's formula (x in the weight's dtype)
    except Exception as e:  # e.g. a sharded (DTensor) weight: not a module the kernel can take
        return f"{type(module).__name__} failed on a random [3, {weight.shape[0]}] input ({type(e).__name__}: {e})"
    if got.shape != want.shape:
        return f"{type(module).__name__} returned shape {tuple(got.shape)} for input {tuple(x.shape)}"
    tol = 2 * torch.finfo(x.dtype).eps
    if not torch.allclose(got.float(), want.float(), rtol=tol, atol=tol):
        return f"{type(module).__name__}'s output differs from HF LlamaRMSNorm's formula on a random input"
    return None


def _decoder_layer(model: nn.Module, layer: int) -> nn.Module:
    from .probe import find_decoder_layers, resolve_layer

    layers = find_decoder_layers(model)
    return layers[resolve_layer(layers, layer)]


def apply_fused_rmsnorm_angle(model: nn.Module, layer: int = -1) -> FusedRMSNormAngle:
    """Replace decoder layer ``layer``'s MLP-input norm (see :func:`mlp_input_norm_name`) by a
    :class:`FusedRMSNormAngle` sharing its ``weight`` Parameter (optimisers, ``state_dict`` keys and checkpoints
    are unchanged) and return it. The original module is kept as ``.original_module`` for
    :func:`revert_fused_rmsnorm_angle`. Already fused: returns the fused module as it is.

    Raises:
        ValueError: no such layer, or its norm is not an HF LlamaRMSNorm-style module (the message says why).
    """
    target = _decoder_layer(model, layer)
    name = mlp_input_norm_name(target)
    norm = getattr(target, name)
    if isinstance(norm, FusedRMSNormAngle):
        return norm
    problem = llama_rmsnorm_problem(norm)
    if problem is not None:
        raise ValueError(f"layer {layer}: `{name}` cannot be fused: {problem}")
    return _replace_with_fused(target, name, norm)


def _replace_with_fused(parent: nn.Module, attr: str, module: nn.Module) -> FusedRMSNormAngle:
    """``parent.attr`` (the checked norm ``module``) replaced by a FusedRMSNormAngle sharing its weight."""
    fused = FusedRMSNormAngle.from_rmsnorm(module)
    fused.__dict__["original_module"] = module  # not a submodule: no second copy of the weight in state_dict
    setattr(parent, attr, fused)
    return fused


def _restore(parent: nn.Module, attr: str, fused: FusedRMSNormAngle) -> nn.Module:
    """Put ``fused``'s original module back at ``parent.attr``, with the weight Parameter the fused module holds now
    (the same one, unless a conversion such as ``model.to(...)`` with parameter swapping replaced it)."""
    original = fused.__dict__["original_module"]
    original.weight = fused.weight
    setattr(parent, attr, original)
    return original


def apply_fused_rmsnorms(model: nn.Module) -> list[str]:
    """Replace every HF LlamaRMSNorm-style module of ``model`` (the decoder layers' norms, the final norm, Qwen3's
    per-head q / k norms: any module with a ``variance_epsilon`` that :func:`llama_rmsnorm_problem` accepts) by a
    :class:`FusedRMSNormAngle` sharing its ``weight``: our RMSNorm kernels forward and backward instead of HF's
    eager formula (about ten kernels each way), as Liger-Kernel's ``apply_*`` does for its own. Without segment info
    the module is a plain RMSNorm; the statistics stay off. Returns the qualified names replaced (modules already
    fused, or refused by the check, are left as they are); :func:`revert_fused_rmsnorms` undoes it.

    Raises:
        ValueError: a norm to replace lies on a device the kernel does not run on (``validate.triton_runs_on``).
    """
    todo = [(name, module) for name, module in model.named_modules()
            if not isinstance(module, FusedRMSNormAngle) and hasattr(module, "variance_epsilon")
            and llama_rmsnorm_problem(module) is None]
    for name, module in todo:  # all checked before any is replaced: an error leaves the model as it was
        if not triton_runs_on(module.weight.device):
            raise ValueError(f"{name}: the fused kernel runs on CUDA (on CPU only under TRITON_INTERPRET=1), the "
                             f"norm is on {module.weight.device}")
    places = [(model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2], module) for name, module in todo]
    for parent, attr, module in places:
        _replace_with_fused(parent, attr, module)
    return [name for name, _ in todo]


def revert_fused_rmsnorms(model: nn.Module) -> list[str]:
    """Put back every module :func:`apply_fused_rmsnorms` or :func:`apply_fused_rmsnorm_angle` replaced; returns
    their qualified names."""
    names = []
    for name, module in list(model.named_modules()):
        if isinstance(module, FusedRMSNormAngle) and "original_module" in module.__dict__:
            parent_name, _, attr = name.rpartition(".")
            _restore(model.get_submodule(parent_name), attr, module)
            names.append(name)
    return names


def revert_fused_rmsnorm_angle(model: nn.Module, layer: int = -1) -> nn.Module:
    """Put back the module :func:`apply_fused_rmsnorm_angle` replaced, and return it (the layer's norm as it is when
    it was not fused)."""
    target = _decoder_layer(model, layer)
    name = mlp_input_norm_name(target)
    norm = getattr(target, name)
    if isinstance(norm, FusedRMSNormAngle) and "original_module" in norm.__dict__:
        return _restore(target, name, norm)
    return norm


__all__ = [
    "MLP_INPUT_NORMS",
    "apply_fused_rmsnorm_angle",
    "apply_fused_rmsnorms",
    "llama_rmsnorm_problem",
    "mlp_input_norm_name",
    "revert_fused_rmsnorm_angle",
    "revert_fused_rmsnorms",
]
