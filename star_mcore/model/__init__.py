"""Megatron-core Llama with this project's core attention, and HF checkpoint loading."""

from .arch import LlamaArch
from .core_attention import AttentionRuntime, AttentionStep, StarCoreAttention
from .hf_checkpoint import SafetensorsReader, load_hf_llama
from .llama import DTYPES, StarLlama, star_layer_spec

__all__ = ["LlamaArch", "AttentionRuntime", "AttentionStep", "StarCoreAttention", "SafetensorsReader",
           "load_hf_llama", "DTYPES", "StarLlama", "star_layer_spec"]
