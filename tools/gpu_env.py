"""The environment stage of ``make gpu-check``: prints one JSON line with the machine, the versions, and, on a
GPU, the two measured ceilings (device-to-device copy bandwidth, counting bytes read and written, and the rate
of an 8192^3 bf16 matmul). Works without torch (says so) and without a GPU (says so)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as exc:
        return f"n/a ({type(exc).__name__})"


def _median_ms(torch, fn, reps: int) -> float:
    """Median of ``reps`` CUDA-event timings after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    return times[len(times) // 2]


def probe() -> dict:
    info: dict = {"python": sys.version.split()[0], "executable": sys.executable, "cpu_count": os.cpu_count(),
                  "platform": platform.platform()}
    info["nvidia_smi"] = _run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,"
                               "power.draw,memory.used,memory.total", "--format=csv,noheader"])
    nvcc = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    info["nvcc"] = _run([nvcc, "--version"]).splitlines()[-1] if os.path.exists(nvcc) else None
    try:
        import torch
    except Exception as exc:
        info.update(torch=None, cuda_available=False, why=f"torch is not importable ({exc})")
        return info
    info.update(torch=torch.__version__, cuda_runtime=torch.version.cuda, cuda_available=torch.cuda.is_available())
    for mod in ("triton", "timm", "numpy"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = None
    for mod in ("xdist", "pytest_timeout"):
        try:
            __import__(mod)
            info[mod] = True
        except Exception:
            info[mod] = False
    if not info["cuda_available"]:
        info["why"] = "no CUDA device visible to torch"
        return info
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, sm_count=p.multi_processor_count, capability=f"{p.major}.{p.minor}",
                memory_gb=round(p.total_memory / 2**30, 1), l2_mb=round(getattr(p, "L2_cache_size", 0) / 2**20, 1),
                smem_per_block_optin=getattr(p, "shared_memory_per_block_optin", None),
                device_count=torch.cuda.device_count())
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    ms = _median_ms(torch, lambda: dst.copy_(src), 20)
    info["copy_bandwidth_gbps"] = round(2 * n / (ms * 1e-3) / 1e9, 1)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    ms = _median_ms(torch, lambda: a @ b, 10)
    info["bf16_matmul_tflops"] = round(2 * 8192**3 / (ms * 1e-3) / 1e12, 1)
    return info


if __name__ == "__main__":
    print(json.dumps(probe()))
