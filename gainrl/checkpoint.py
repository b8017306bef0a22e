"""Atomic training checkpoints: safetensors weights, optimiser, sampler / trainer state and RNG states.

Layout of ``RUN/checkpoints/``::

    step-000040/            one complete checkpoint
        model.safetensors   policy weights (``safetensors.torch.save_model``: tied weights stored once)
        config.json         model config (the folder loads with ``from_pretrained``; tokenizer files too)
        optimizer.pt        ``optimizer.state_dict()``
        trainer_state.json  step, epoch, sampler state, epoch accumulators, ... (plain JSON)
        rng.pt              python / numpy / torch (CPU and CUDA) generator states
        COMPLETE            written last: the folder is whole
    latest                  name of the newest complete checkpoint (replaced atomically)

A save writes everything into a fresh ``.tmp-*`` folder (each file fsynced), renames it into place with
``os.replace`` and only then repoints ``latest``; older checkpoints beyond ``keep`` are deleted afterwards. A crash
at any moment leaves the previous checkpoint and ``latest`` untouched (at worst a stale ``.tmp-*`` folder, removed
by the next save). :func:`latest_checkpoint` also falls back to the newest complete folder when ``latest`` is
missing or points to a broken one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
COMPLETE = "COMPLETE"
_STEP_RE = re.compile(r"^step-(\d+)$")

REQUIRED_FILES = ("model.safetensors", "optimizer.pt", "trainer_state.json", "rng.pt", COMPLETE)


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace`` (fsynced)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(p.parent)


# --------------------------------------------------------------------------------------------------------------
# RNG states
# --------------------------------------------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """Python, NumPy (global), torch CPU and CUDA generator states."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng` (CUDA states only when CUDA is available)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------------------------


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def is_complete(path: Path) -> bool:
    """Whether a checkpoint folder holds every file (its ``COMPLETE`` marker is written last)."""
    return all((path / name).is_file() for name in REQUIRED_FILES)


def _write_weights(model: torch.nn.Module, folder: Path) -> None:
    from safetensors.torch import save_model

    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_file"):
        config.to_json_file(str(folder / "config.json"))


def _write_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    *,
    rng_state: dict[str, Any] | None = None,
    tokenizer: Any = None,
    keep: int = 2,
) -> Path:
    """Write checkpoint ``step`` atomically under ``RUN/checkpoints`` and return its folder.

    ``trainer_state`` must be JSON-serialisable. ``rng_state`` defaults to :func:`capture_rng` (call it at the
    point the run should continue from). At most ``keep`` complete checkpoints are kept.
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by an interrupted save
        shutil.rmtree(stale, ignore_errors=True)
    name = checkpoint_name(step)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
    try:
        _write_weights(model, tmp)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(str(tmp))
        _write_optimizer(optimizer, tmp)
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1, allow_nan=False), encoding="utf-8")
        torch.save(rng_state if rng_state is not None else capture_rng(), tmp / "rng.pt")
        (tmp / COMPLETE).write_text(f"{step}\n", encoding="utf-8")
        for p in tmp.iterdir():
            if p.is_file():
                _fsync_file(p)
        _fsync_dir(tmp)
        final = root / name
        if final.exists():  # the same step saved again (e.g. a rerun): move the old copy out of the way first
            old = root / f".tmp-old-{name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / LATEST, name + "\n")
    for _, old in _step_dirs(root)[:-keep] if keep > 0 else []:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run (``latest``, else the highest complete ``step-*``), or ``None``."""
    root = Path(run_dir) / CHECKPOINT_DIR
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text(encoding="utf-8").strip()
        if candidate.name and is_complete(candidate):
            return candidate
    complete = [p for _, p in _step_dirs(root) if is_complete(p)]
    return complete[-1] if complete else None


def load_checkpoint(
    path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load weights (and the optimiser state) from a checkpoint folder; returns ``(trainer_state, rng_state)``.

    The RNG state is returned, not applied (:func:`restore_rng`), so that the caller restores it last.
    """
    from safetensors.torch import load_model

    folder = Path(path)
    if not is_complete(folder):
        missing = [n for n in REQUIRED_FILES if not (folder / n).is_file()]
        raise FileNotFoundError(f"{folder} is not a complete checkpoint (missing {missing})")
    missing_keys, unexpected = load_model(model, str(folder / "model.safetensors"), strict=False)
    if missing_keys or unexpected:
        raise ValueError(
            f"{folder}: checkpoint weights do not match the model (missing {sorted(missing_keys)[:5]}, unexpected "
            f"{sorted(unexpected)[:5]})"
        )
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
    state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    rng = torch.load(folder / "rng.pt", map_location="cpu", weights_only=False)
    return state, rng


__all__ = [
    "atomic_write_text",
    "capture_rng",
    "checkpoint_name",
    "is_complete",
    "latest_checkpoint",
    "load_checkpoint",
    "restore_rng",
    "save_checkpoint",
]
