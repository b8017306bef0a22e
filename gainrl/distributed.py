"""The process group of a ``torchrun`` launch, for jobs that shard work across ranks (`gainrl score`).

``torchrun --nproc-per-node N -m gainrl score …`` sets ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` /
``LOCAL_RANK``; :func:`join_from_env` joins (or reuses) the default process group -- NCCL when the job runs on
CUDA, gloo on CPU -- so that ranks can wait for each other and agree on shared state. Only small Python objects
travel through it (settings fingerprints, lists of batch ids); results go through files in the shared output
folder, which keeps every rank's work resumable on its own.
"""
from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass
from typing import Any

import torch

#: How long a rank waits for the others (a collective's timeout). Ranks meet only before and after their shard,
#: so the wait covers the slowest rank's whole shard: generous by default, ``GAINRL_DIST_TIMEOUT_MIN`` overrides.
DEFAULT_TIMEOUT_MIN = 24 * 60


def launched_by_torchrun() -> bool:
    """True when the environment describes a multi-process launch (``WORLD_SIZE > 1`` with a rendezvous address)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "MASTER_ADDR" in os.environ


@dataclass
class ProcessGroup:
    """This process's place in a launch: ``rank`` of ``world_size``; ``owned`` when we created the group (and
    destroy it in :meth:`close`)."""

    rank: int
    world_size: int
    owned: bool

    def barrier(self) -> None:
        torch.distributed.barrier()

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """``obj`` as rank ``src`` has it, on every rank (a picklable Python object)."""
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=src)
        return box[0]

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, indexed by rank."""
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def close(self, finished: bool = True) -> None:
        """Destroy the group if we created it. ``finished`` (every rank got here normally): first a barrier, so that
        no rank tears down while another still has collective work in flight. After an error there is no barrier
        (the other ranks may be gone: it could hang). The garbage collection frees the collectives' work objects
        while the interpreter is fully alive: left to interpreter shutdown, gloo's threads could release their
        tensors after the interpreter was torn down and abort the process ("terminate called without an active
        exception"), turning a finished run into a failed exit."""
        if self.owned and torch.distributed.is_initialized():
            if finished:
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()
            gc.collect()


def join_from_env(device: torch.device) -> ProcessGroup | None:
    """Join the launch described by the environment (``None`` when there is none: a single process).

    Reuses an existing default group; otherwise initialises one with NCCL for a CUDA ``device`` (after making it
    the current device) and gloo otherwise.
    """
    if not torch.distributed.is_available():
        if launched_by_torchrun():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        return None
    if torch.distributed.is_initialized():
        return ProcessGroup(torch.distributed.get_rank(), torch.distributed.get_world_size(), owned=False)
    if not launched_by_torchrun():
        return None
    if device.type == "cuda":
        torch.cuda.set_device(device)
    minutes = float(os.environ.get("GAINRL_DIST_TIMEOUT_MIN", DEFAULT_TIMEOUT_MIN))
    torch.distributed.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo",
        timeout=datetime.timedelta(minutes=minutes),
        **({"device_id": device} if device.type == "cuda" else {}),
    )
    return ProcessGroup(torch.distributed.get_rank(), torch.distributed.get_world_size(), owned=True)


__all__ = ["DEFAULT_TIMEOUT_MIN", "ProcessGroup", "join_from_env", "launched_by_torchrun"]
