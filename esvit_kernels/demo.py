"""``python -m esvit_kernels.demo``: run the fused ops against the eager reference on this machine.

On a CUDA device the compiled kernels run at a Swin-T stage-1 shape. On a CPU-only machine the Triton
kernels run through the interpreter (``TRITON_INTERPRET=1``, set by ``make demo``) at a small shape --
a correctness check, not a speed measurement.
"""

from __future__ import annotations

import argparse
import time

import torch

from . import reference
from .backends import available_backends
from .functional import shifted_window_attention


def _fused_backends(device: str) -> list[str]:
    return [n for n in ("triton", "cuda") if available_backends()[n].available
            and device in available_backends()[n].devices]


def check_window_attention(device: str, batch: int, res: int, dtype: torch.dtype) -> list[dict]:
    """Shifted window attention (Swin-T stage 1 geometry: C=96, 3 heads, W7, shift 3) fused vs reference."""
    heads, c = 3, 96
    qkv = torch.randn(batch, res, res, 3 * c, device=device, dtype=dtype, requires_grad=True)
    table = torch.randn(169, heads, device=device, requires_grad=True)
    ref = reference.shifted_window_attention(qkv.float(), heads, (7, 7), (3, 3), table)
    grad = torch.randn_like(ref)
    ref_dq, ref_dt = torch.autograd.grad(ref, (qkv, table), grad)
    rows = []
    for backend in _fused_backends(device):
        t0 = time.perf_counter()
        out = shifted_window_attention(qkv, num_heads=heads, window_size=7, shift_size=3, bias_table=table,
                                       backend=backend)
        dq, dt = torch.autograd.grad(out, (qkv, table), grad.to(dtype))
        if device == "cuda":
            torch.cuda.synchronize()
        rows.append({
            "backend": backend,
            "out_err": ((out.float() - ref).abs().max() / ref.abs().max()).item(),
            "dqkv_err": ((dq.float() - ref_dq).abs().max() / ref_dq.abs().max()).item(),
            "dbias_err": ((dt - ref_dt).abs().max() / ref_dt.abs().max()).item(),
            "seconds": time.perf_counter() - t0,
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch, res = (32, 56) if device == "cuda" else (1, 14)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    torch.manual_seed(0)
    print(f"fused shifted-window attention vs eager reference on {device}: B={batch}, {res}x{res}, C=96, "
          f"3 heads, window 7, shift 3, {str(dtype).replace('torch.', '')}")
    rows = check_window_attention(device, batch, res, dtype)
    if not rows:
        print("  no fused backend runs here (see `python -m esvit_kernels`); set TRITON_INTERPRET=1 to run the "
              "Triton kernels on the CPU")
        return 1
    for r in rows:
        note = " (Triton interpreter: a correctness check, not a timing)" if device == "cpu" else ""
        print(f"  {r['backend']:6s} max rel err: out {r['out_err']:.1e}, dqkv {r['dqkv_err']:.1e}, "
              f"dbias {r['dbias_err']:.1e}; fwd+bwd {r['seconds'] * 1e3:.1f} ms{note}")
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    bad = [r for r in rows if max(r["out_err"], r["dqkv_err"], r["dbias_err"]) > tol]
    print("  OK" if not bad else f"  MISMATCH in {[r['backend'] for r in bad]}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
