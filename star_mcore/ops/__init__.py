"""Pure tensor math: attention kernels returning (out, lse), the LSE merge, RoPE, token layouts."""

from .attention import BACKENDS, attend, attend_prefix_causal, math_attention, resolve_backend
from .layout import (Span, ring_chunk_ids, ring_chunks, star_block_tokens, star_blocks,
                     star_layout)
from .merge import merge_partials
from .rope import apply_rope, inv_frequencies, rope_cos_sin

__all__ = [
    "BACKENDS", "attend", "attend_prefix_causal", "math_attention", "resolve_backend",
    "Span", "ring_chunk_ids", "ring_chunks", "star_block_tokens", "star_blocks", "star_layout",
    "merge_partials", "apply_rope", "inv_frequencies", "rope_cos_sin",
]
