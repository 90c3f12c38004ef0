"""Attention: tiling, reference, kernels, KV cache, DMA."""
