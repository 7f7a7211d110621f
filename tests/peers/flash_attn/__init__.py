"""CPU stand-in for flash-attn's private functions (see ../README.md); benchmarks only."""
__version__ = "2.6.3+cpu-standin"
