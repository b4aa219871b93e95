"""Build script: pure-Python package plus (later) the optional CUDA extension ``esvit_kernels._C``."""

from setuptools import setup

setup()
