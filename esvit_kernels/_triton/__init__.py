"""Triton kernels and their launchers (imported lazily: triton is optional)."""
