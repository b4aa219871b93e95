"""Fused implementations behind the functional API: ``torch.library`` custom ops (schemas, fake/meta
implementations for ``torch.compile``, autograd) wrapping the Triton kernels and the CUDA extension.

Each module exposes ``get(op, backend) -> callable`` used by :mod:`esvit_kernels.functional`.
"""
