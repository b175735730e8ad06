"""Process groups: torch.distributed start-up and Megatron-core's TP x CP grid.

The context-parallel group is the set of star hosts; tensor parallelism lives inside each host. Groups are
handed to everything else explicitly as a :class:`ParallelGroups`, never read from globals.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.distributed as dist

from ..mcore_compat import ProcessGroupCollection, parallel_state


@dataclass
class ParallelGroups:
    """The groups this project uses, plus the mcore collection its modules take."""

    pg_collection: ProcessGroupCollection
    tp: dist.ProcessGroup
    cp: dist.ProcessGroup
    device: torch.device

    @property
    def cp_rank(self) -> int:
        return self.cp.rank()

    @property
    def cp_size(self) -> int:
        return self.cp.size()

    @property
    def tp_rank(self) -> int:
        return self.tp.rank()

    @property
    def is_query_host(self) -> bool:
        """The last CP rank holds the query and everything generated after it."""
        return self.cp_rank == self.cp_size - 1

    def cp_global_rank(self, cp_rank: int) -> int:
        return dist.get_global_rank(self.cp, cp_rank)


def cuda_allocator_defaults() -> None:
    """Each request allocates a few huge tensors of new sizes: expandable segments keep the caching allocator
    from holding fragments (measured up to 12 GiB reserved beyond the peak; docs/performance.md). torch reads
    the setting when CUDA starts, so this must run before the process's first CUDA call; a user's own
    ``PYTORCH_CUDA_ALLOC_CONF`` wins."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def init_process_group(accelerator: str, timeout_s: float) -> torch.device:
    """Join the job torchrun/srun started (a single process needs no launcher). Returns this rank's device."""
    if accelerator == "gpu":
        cuda_allocator_defaults()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29511")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        # No device_id: NCCL communicators are then made on a group's first collective, not for each of the
        # dozen groups mcore creates (eagerly they held 7 GiB of every GPU, measured on H100).
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return device


def initialize_parallel(tp: int, cp: int, device: torch.device, timeout_s: float) -> ParallelGroups:
    """Build mcore's TP x CP grid (order tp-cp: a host's TP ranks are adjacent, hosts follow each other)."""
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        context_parallel_size=cp,
        distributed_timeout_minutes=max(1, int(round(timeout_s / 60))),
        create_gloo_process_groups=False,
    )
    pgs = ProcessGroupCollection.use_mpu_process_groups()
    return ParallelGroups(pg_collection=pgs, tp=pgs.tp, cp=pgs.cp, device=device)


def destroy_parallel() -> None:
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def reduce_max(values: List[float], device: torch.device) -> List[float]:
    """Each value's maximum over every rank of the world (as given where the world is one rank)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def control_group() -> Optional[dist.ProcessGroup]:
    """A gloo group over the whole world for small Python objects (a server's commands): on GPU the world's
    NCCL group would spin a GPU kernel while ranks wait for the next request. None: the world group (already
    gloo), or a world of one. Every rank must call it, at the same point."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    return None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


def broadcast_from_rank0(value: Any, group: Optional[dist.ProcessGroup] = None) -> Any:
    """Rank 0's ``value`` (any picklable object) on every rank, in one broadcast over ``group`` (the world by
    default): every rank then acts on the same thing, in the same order."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]
