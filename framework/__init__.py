"""longreach: distributed long-context training for PyTorch.

Kept light on purpose: importing ``longreach`` pulls in no transformers, deepspeed or triton.
"""
__version__ = "0.1.0"
