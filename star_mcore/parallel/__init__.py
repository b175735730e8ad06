"""The only code that touches process groups."""

from .anchor import AnchorBroadcast
from .context_parallel import broadcast_from_last, gather_merge, ring_attention
from .groups import ParallelGroups, destroy_parallel, init_process_group, initialize_parallel

__all__ = ["AnchorBroadcast", "broadcast_from_last", "gather_merge", "ring_attention", "ParallelGroups",
           "destroy_parallel",
           "init_process_group", "initialize_parallel"]
