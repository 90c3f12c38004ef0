"""Numba CUDA attention kernels and their launchers."""
