"""``python -m esvit_kernels``: environment report (versions, GPU, which backends run and why not)."""

from __future__ import annotations

import json
import platform
import sys

import torch

from .backends import available_backends


def environment() -> dict:
    """Versions, device and backend availability as plain data."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda_runtime": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu": gpu,
        "backends": {
            name: {"available": s.available, "devices": list(s.devices), "reason": s.reason}
            for name, s in available_backends().items()
        },
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    env = environment()
    if "--json" in argv:
        print(json.dumps(env, indent=2))
        return 0
    print("esvit-kernels environment")
    for key in ("python", "torch", "triton", "cuda_runtime", "gpu"):
        print(f"  {key:13s} {env[key] if env[key] is not None else '-'}")
    print("backends")
    for name, s in env["backends"].items():
        mark = "yes" if s["available"] else "no "
        where = f" [{', '.join(s['devices'])}]" if s["devices"] else ""
        print(f"  {name:7s} {mark}{where}  {s['reason']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
