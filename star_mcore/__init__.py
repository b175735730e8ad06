"""Star Attention (Acharya et al., 2024) as a context-parallel inference mode for Megatron-core."""

__version__ = "0.1.0"
