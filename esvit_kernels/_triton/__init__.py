"""Triton kernels and their launchers (imported lazily by :mod:`esvit_kernels.ops`)."""
