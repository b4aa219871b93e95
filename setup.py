"""Build script: the pure-Python package plus the optional CUDA extension ``esvit_kernels._C`` (csrc/).

The extension is built with torch's ``BuildExtension`` (ninja: incremental, header dependencies tracked)
when a CUDA toolkit is found (``CUDA_HOME``, or torch's own detection of /usr/local/cuda, nvcc on PATH).

Environment:
    ESVIT_KERNELS_BUILD_CUDA   unset/"auto": build when a toolkit is found, else skip with a message;
                               "0": never build; "1": build, and a missing toolkit (or torch) is an error.
    TORCH_CUDA_ARCH_LIST       architectures to compile for; default: the visible GPUs, or "8.0;9.0"
                               when there is none (a CPU build machine).
    MAX_JOBS                   parallel compile jobs (ninja).

Developer loop: ``python setup.py build_ext --inplace`` (what ``make build`` / ``make test`` run); a second
run recompiles only changed sources.
"""

import glob
import os
import sys

from setuptools import setup

CSRC = "csrc"
DEFAULT_ARCH_LIST = "8.0;9.0"


def _say(msg: str) -> None:
    print(f"esvit-kernels setup: {msg}", file=sys.stderr)


def _cuda_extension():
    """(ext_modules, cmdclass) for the CUDA extension, or ([], {}) when it is not built."""
    mode = os.environ.get("ESVIT_KERNELS_BUILD_CUDA", "auto").strip().lower() or "auto"
    if mode not in ("0", "1", "auto"):
        raise SystemExit(f"ESVIT_KERNELS_BUILD_CUDA must be 0, 1 or auto, got {mode!r}")
    if mode == "0":
        _say("ESVIT_KERNELS_BUILD_CUDA=0: not building the CUDA extension esvit_kernels._C")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as exc:
        if mode == "1":
            raise SystemExit(f"ESVIT_KERNELS_BUILD_CUDA=1 but torch is not importable: {exc}") from exc
        _say(f"torch is not importable ({exc}); not building the CUDA extension esvit_kernels._C")
        return [], {}
    if CUDA_HOME is None or torch.version.cuda is None:
        why = ("torch is a CPU-only build" if torch.version.cuda is None
               else "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)")
        if mode == "1":
            raise SystemExit(f"ESVIT_KERNELS_BUILD_CUDA=1 but {why}")
        _say(f"{why}; not building the CUDA extension esvit_kernels._C (the cuda backend will be unavailable)")
        return [], {}
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    _say(f"building esvit_kernels._C with CUDA_HOME={CUDA_HOME}, "
         f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '(visible GPUs)')}")
    sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")) + glob.glob(os.path.join(CSRC, "*.cu")))
    headers = sorted(glob.glob(os.path.join(CSRC, "*.h")) + glob.glob(os.path.join(CSRC, "*.cuh")))
    ext = CUDAExtension(
        name="esvit_kernels._C",
        sources=sources,
        depends=headers,  # setuptools relinks only when a source or one of these is newer than the .so
        extra_compile_args={
            "cxx": ["-O3"],
            # No --use_fast_math: the softmax uses exp2f / log2f at full accuracy for tight fp32 results.
            "nvcc": ["-O3", "-lineinfo"],
        },
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
