"""Whether this project's Triton kernels can be used: Triton imports (CUDA torch ships it; on CPU it runs only
in its interpreter, which the tests turn on)."""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
