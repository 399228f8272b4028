"""Counter-based normal noise in Triton: row ``s`` of the output is ``tl.randn(keys[s], arange(n))``.

This is the in-kernel form of :func:`tempflow.rng.normal_from_keys` (the pure-torch reference); the fused
step kernels generate their noise the same way.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET

BLOCK = 1024
# as the branch kernels: no fused multiply-add, so the normals do not change with Triton's default (on in 3.9, off
# from 3.10) and equal the in-kernel noise of the step kernels bit for bit
_LAUNCH = {} if INTERPRET else {"num_warps": 4, "enable_fp_fusion": False}


@triton.jit
def _philox_normal_kernel(keys_ptr, out_ptr, n, offset, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    col = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    key = tl.load(keys_ptr + row)
    z = tl.randn(key, col + offset)
    tl.store(out_ptr + row.to(tl.int64) * n + col, z, mask=col < n)


def philox_normal(keys: torch.Tensor, n: int, offset: int = 0) -> torch.Tensor:
    """``(S,)`` int64 keys -> ``(S, n)`` fp32 standard normals (element ``i`` uses counter ``offset + i``)."""
    keys = keys.reshape(-1).to(torch.int64).contiguous()
    out = torch.empty((keys.numel(), n), dtype=torch.float32, device=keys.device)
    if out.numel():
        grid = (keys.numel(), triton.cdiv(n, BLOCK))
        _philox_normal_kernel[grid](keys, out, n, offset, BLOCK=BLOCK, **_LAUNCH)
    return out
