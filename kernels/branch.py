"""Triton kernels of the fused branch ops (the CUDA-tensor path of :mod:`tempflow.ops`).

One program handles one block of BLOCK elements of one batch row: it reads the row's x and v once, forms the SDE
mean in registers, then loops over the K branches. Partial sums are written per (row, block, branch) and reduced
afterwards in a fixed order, so the result is deterministic. Launched with ``enable_fp_fusion=False`` so that
``mean + std * eps`` rounds like the torch reference. The noise of the keys path is ``tl.randn(key, offsets)``,
the stream of :mod:`tempflow.rng`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import INTERPRET

BLOCK = 1024
_LAUNCH = {} if INTERPRET else {"num_warps": 4, "enable_fp_fusion": False}


@triton.jit
def _row_block(x_ptr, v_ptr, cx_ptr, cv_ptr, D, BLOCK: tl.constexpr):
    """This program's row b, its block's offsets and mask, the velocity and the SDE mean ``cx x + cv v`` (fp32)."""
    b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    x = tl.load(x_ptr + b * D + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + b * D + offs, mask=mask, other=0.0).to(tl.float32)
    return b, offs, mask, v, x * tl.load(cx_ptr + b) + v * tl.load(cv_ptr + b)


@triton.jit
def _sample_kernel(
    x_ptr, v_ptr, cx_ptr, cv_ptr, std_ptr, noise_ptr, keys_ptr, out_ptr, mean_ptr, part_ptr,
    D, K, nblk,
    HAS_NOISE: tl.constexpr, RETURN_MEAN: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    b, offs, mask, v, m = _row_block(x_ptr, v_ptr, cx_ptr, cv_ptr, D, BLOCK)
    blk = tl.program_id(1).to(tl.int64)
    s = tl.load(std_ptr + b)
    if RETURN_MEAN:
        tl.store(mean_ptr + b * D + offs, m, mask=mask)
    for k in range(K):
        row = b * K + k
        if HAS_NOISE:
            e = tl.load(noise_ptr + row * D + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            e = tl.randn(tl.load(keys_ptr + row), offs)
        a = m + s * e
        tl.store(out_ptr + row * D + offs, a, mask=mask)
        d = tl.where(mask, a - m, 0.0)
        tl.store(part_ptr + (b * nblk + blk) * K + k, tl.sum(d * d, axis=0))


@triton.jit
def _logp_kernel(
    v_ptr, x_ptr, a_ptr, cx_ptr, cv_ptr, vref_ptr, part_ptr, part_kl_ptr,
    D, K, nblk,
    HAS_REF: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    b, offs, mask, v, m = _row_block(x_ptr, v_ptr, cx_ptr, cv_ptr, D, BLOCK)
    blk = tl.program_id(1).to(tl.int64)
    for k in range(K):
        a = tl.load(a_ptr + (b * K + k) * D + offs, mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, a - m, 0.0)
        tl.store(part_ptr + (b * nblk + blk) * K + k, tl.sum(d * d, axis=0))
    if HAS_REF:
        r = tl.load(vref_ptr + b * D + offs, mask=mask, other=0.0).to(tl.float32)
        dk = tl.where(mask, v - r, 0.0)
        tl.store(part_kl_ptr + b * nblk + blk, tl.sum(dk * dk, axis=0))
    else:
        tl.store(part_kl_ptr + b * nblk + blk, 0.0)


@triton.jit
def _logp_backward_kernel(
    alpha_ptr, beta_ptr, v_ptr, x_ptr, a_ptr, cx_ptr, cv_ptr, vref_ptr, grad_ptr,
    D, K,
    HAS_REF: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    b, offs, mask, v, m = _row_block(x_ptr, v_ptr, cx_ptr, cv_ptr, D, BLOCK)
    g = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_REF:
        r = tl.load(vref_ptr + b * D + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(beta_ptr + b) * (v - r)
    for k in range(K):
        a = tl.load(a_ptr + (b * K + k) * D + offs, mask=mask, other=0.0).to(tl.float32)
        g += tl.load(alpha_ptr + b * K + k) * (a - m)
    tl.store(grad_ptr + b * D + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)


# ---- launchers: the same contract as the C++ ops (csrc/cpu/ops.h) --------------------------------------------


def _alloc(shape, dtype, device) -> torch.Tensor:
    """Uninitialised output; NaN-filled under TEMPFLOW_POISON_OUTPUTS=1 so that an unwritten element shows."""
    if os.environ.get("TEMPFLOW_POISON_OUTPUTS", "0") not in ("", "0"):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _grid(b: int, d: int) -> tuple[int, int]:
    return (b, triton.cdiv(d, BLOCK))


def branch_sample(x, v, coef_x, coef_v, std, noise, keys, K: int, return_mean: bool):
    b, d = x.shape
    x, v = x.contiguous(), v.contiguous()
    out = _alloc((b, K, d), torch.float32, x.device)
    mean = _alloc((b, d) if return_mean else (0,), torch.float32, x.device)
    nblk = triton.cdiv(d, BLOCK)
    part = _alloc((b, nblk, K), torch.float32, x.device)
    has_noise = noise is not None
    _sample_kernel[_grid(b, d)](
        x, v, coef_x, coef_v, std,
        noise.contiguous() if has_noise else x, keys.contiguous() if not has_noise else coef_x,
        out, mean if return_mean else out, part, d, K, nblk,
        HAS_NOISE=has_noise, RETURN_MEAN=return_mean, BLOCK=BLOCK, **_LAUNCH,
    )  # fmt: skip
    return out, part.sum(dim=1), mean


def branch_logp(v, x, actions, coef_x, coef_v, v_ref):
    b, k, d = actions.shape
    nblk = triton.cdiv(d, BLOCK)
    part = _alloc((b, nblk, k), torch.float32, x.device)
    part_kl = _alloc((b, nblk), torch.float32, x.device)
    has_ref = v_ref is not None
    _logp_kernel[_grid(b, d)](
        v.contiguous(), x.contiguous(), actions.contiguous(), coef_x, coef_v,
        v_ref.contiguous() if has_ref else v, part, part_kl, d, k, nblk,
        HAS_REF=has_ref, BLOCK=BLOCK, **_LAUNCH,
    )  # fmt: skip
    return part.sum(dim=1), part_kl.sum(dim=1)


def branch_logp_backward(alpha, beta, v, x, actions, coef_x, coef_v, v_ref):
    b, k, d = actions.shape
    v = v.contiguous()
    grad = _alloc(v.shape, v.dtype, v.device)
    has_ref = v_ref is not None
    _logp_backward_kernel[_grid(b, d)](
        alpha.contiguous(), beta.contiguous(), v, x.contiguous(), actions.contiguous(), coef_x, coef_v,
        v_ref.contiguous() if has_ref else v, grad, d, k,
        HAS_REF=has_ref, BLOCK=BLOCK, **_LAUNCH,
    )  # fmt: skip
    return grad
