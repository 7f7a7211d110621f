"""CPU stand-in for flash-attn's functions (see ../README.md); benchmarks only."""
from .flash_attn_interface import flash_attn_func

__version__ = "2.6.3+cpu-standin"
__all__ = ["flash_attn_func"]
