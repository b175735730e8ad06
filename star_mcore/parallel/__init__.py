"""The only code that touches process groups.

Import the modules by name: only ``groups`` (mcore's TP x CP grid) imports Megatron-core, so ``anchor`` and
``context_parallel``, which the inference modes (and through them the memory planner) use, come without it.
"""
