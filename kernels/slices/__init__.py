"""Masks run as batched dense attention: slice plans (:mod:`.plan`) and their executor (:mod:`.executor`).

A mask on concrete positions compiles to *units* — (query rows, key rows, query heads) rectangles of kind
full, causal (square, diagonal aligned) or, for what the mask's analytic form cannot express, an explicit
tile-sized mask — and units of one shape and kind run as one call of the device's dense kernel with the
units stacked in the batch dimension; results are merged by LSE. Backends: ``slices`` (CPU, PyTorch's
CPU flash kernel; :mod:`.cpu`) and ``flash`` (CUDA, flash-attn's varlen API or PyTorch SDPA;
:mod:`longreach.kernels.dense.flash`).
"""
