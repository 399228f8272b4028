"""Counter-based Gaussian noise: Philox4x32-10 plus Box-Muller, in plain torch integer ops.

Every noise value is a pure function of ``(seed, stream ids, element index)``: nothing depends on the batch
it was drawn in, the order of the streams, the device or the number of ranks. This is what makes a batched
rollout engine give exactly the samples of a naive per-seed loop.

Layout of the stream
--------------------
1. A stream is named by a seed and a tuple of integer ids, e.g. ``(prompt, seed_index, step, branch)``.
   :func:`stream_keys` folds them into one 64-bit Philox key per stream::

       key = seed
       for depth, id in enumerate(ids):
           key = lo64(philox(key, counter=(id_lo, id_hi, depth + 1, STREAM_TAG)))

   The derivation counters have a non-zero third word, so they never collide with element counters.
2. Element ``i`` of a stream is exactly Triton's ``tl.randn(key, i)``::

       (c0, c1, _, _) = philox4x32_10(key=(key_lo, key_hi), counter=(i_lo, i_hi, 0, 0))
       u1, u2 = uint_to_uniform_float(c0), uint_to_uniform_float(c1)   # int32 -> [0, 1)
       z = sqrt(-2 log(max(u1, 1e-7))) * cos(2 pi u2)                   # fp32 Box-Muller

   so a Triton kernel that loads the (int64) key of its row and calls ``tl.randn(key, offsets)`` reproduces
   this stream: integers and uniforms bit for bit, the normal to the last bits of the device's ``log``/``cos``.
   The C++ kernel (``tempflow.ops``) follows the same recipe.

Integers are held as uint32 values inside int64 tensors; products wrap modulo 2**64 exactly as uint64 would,
so ``(a * b) >> 32`` and ``(a * b) & MASK`` give Philox's ``mulhi``/``mullo`` on every device.

Example::

    >>> from tempflow import rng
    >>> ids = torch.tensor([[0, 0, 3, b] for b in range(6)])   # prompt 0, seed 0, step 3, six branches
    >>> eps = rng.normal(1234, ids, (16, 64, 64))               # (6, 16, 64, 64)
    >>> torch.equal(eps[4], rng.normal(1234, [0, 0, 3, 4], (16, 64, 64)))
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "STREAM_TAG",
    "philox4x32",
    "stream_keys",
    "randint4x",
    "uniform_from_uint32",
    "box_muller",
    "normal_from_keys",
    "normal",
]

MASK32 = 0xFFFFFFFF
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_ROUNDS = 10
STREAM_TAG = 0x7E3F1017  # fourth counter word of key derivation ("tempflow"): never used by element draws
UNIFORM_SCALE = 4.6566127342e-10  # Triton's: largest scale with (2**31 - 1) * scale < 1 in fp32
BOX_MULLER_EPS = 1.0e-7
TWO_PI = 6.283185307179586
_MAX_ELEMENTS = 1 << 62  # element indices are non-negative int64


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    p = b * a  # exact modulo 2**64
    return (p >> 32) & MASK32, p & MASK32


def philox4x32(
    c0: torch.Tensor,
    c1: torch.Tensor,
    c2: torch.Tensor,
    c3: torch.Tensor,
    k0: torch.Tensor,
    k1: torch.Tensor,
    rounds: int = PHILOX_ROUNDS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32 with Triton's round structure. All inputs are int64 tensors holding uint32 values
    (broadcastable); returns the four output words the same way."""
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & MASK32
        k1 = (k1 + PHILOX_KEY_B) & MASK32
    return c0, c1, c2, c3


def _split64(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x & MASK32, (x >> 32) & MASK32


def _as_int64(value, name: str, device=None) -> torch.Tensor:
    t = torch.as_tensor(value, device=device)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be integers, got dtype {t.dtype}")
    return t.to(torch.int64)


def stream_keys(seed, stream_ids, device=None) -> torch.Tensor:
    """One 64-bit Philox key per stream (returned as int64, the bit pattern of the uint64 key).

    Args:
        seed: Python int (0 <= seed < 2**63) or int64 tensor broadcastable to the stream batch.
        stream_ids: integers of shape ``(*S, n_ids)`` (a tensor, or nested sequences); a flat sequence
            ``[p, s, k, b]`` is one stream. Each id is taken as its 64-bit pattern. ``n_ids`` may be 0.
        device: where to build the keys (defaults to the ids' device).

    Returns:
        int64 tensor of shape ``S``.
    """
    ids = _as_int64(stream_ids, "stream_ids", device)
    if ids.dim() == 0:
        raise ValueError("stream_ids must have a last dimension of ids, e.g. [prompt, seed, step, branch]")
    if isinstance(seed, int) and not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    key = torch.broadcast_to(_as_int64(seed, "seed", ids.device), ids.shape[:-1])
    tag = torch.full((), STREAM_TAG, dtype=torch.int64, device=ids.device)
    for depth in range(ids.shape[-1]):
        k0, k1 = _split64(key)
        i0, i1 = _split64(ids[..., depth])
        w0, w1, _, _ = philox4x32(i0, i1, torch.full_like(i0, depth + 1), tag.expand_as(i0), k0, k1)
        key = w0 | (w1 << 32)  # wraps into the sign bit exactly like a uint64 bit pattern
    return key


def randint4x(keys: torch.Tensor, offsets: torch.Tensor):
    """Triton's ``tl.randint4x(key, offset)``: four uint32 words (as int64) for each (key, offset) pair."""
    k0, k1 = _split64(keys)
    c0, c1 = _split64(offsets)
    zero = torch.zeros((), dtype=torch.int64, device=offsets.device)
    return philox4x32(c0, c1, zero, zero, k0, k1)


def uniform_from_uint32(x: torch.Tensor) -> torch.Tensor:
    """Triton's ``uint_to_uniform_float`` for 32-bit words: fp32 in [0, 1)."""
    folded = torch.where(x >= 2**31, MASK32 - x, x)  # int32 bitcast, then ~x for negatives
    return folded.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32, device=x.device)


def box_muller(u1: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    """Triton's ``pair_uniform_to_normal`` (first output), fp32."""
    u1 = torch.clamp_min(u1, BOX_MULLER_EPS)
    th = u2 * torch.tensor(TWO_PI, dtype=torch.float32, device=u2.device)
    r = torch.sqrt(-2.0 * torch.log(u1))
    return r * torch.cos(th)


def normal_from_keys(keys: torch.Tensor, shape: Sequence[int] | torch.Size, offset: int = 0) -> torch.Tensor:
    """Standard normal fp32 noise of shape ``(*keys.shape, *shape)``; element ``i`` of a stream (row-major
    index into ``shape``, plus ``offset``) is ``tl.randn(key, offset + i)``."""
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    if offset < 0 or offset + n > _MAX_ELEMENTS:
        raise ValueError(f"element range [{offset}, {offset + n}) is outside [0, 2**62)")
    keys = keys.to(torch.int64)
    idx = torch.arange(offset, offset + n, dtype=torch.int64, device=keys.device)
    i1, i2, _, _ = randint4x(keys.reshape(-1, 1), idx)
    z = box_muller(uniform_from_uint32(i1), uniform_from_uint32(i2))
    return z.reshape(*keys.shape, *shape)


def normal(
    seed, stream_ids, shape: Sequence[int] | torch.Size, *, device=None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Counter-based standard normal noise: a pure function of ``(seed, stream ids, element index)``.

    Args:
        seed: the run's seed (int, 0 <= seed < 2**63).
        stream_ids: ``(*S, n_ids)`` integer ids, e.g. rows of ``[prompt, seed_index, step, branch]``;
            a flat list is a single stream (``S = ()``).
        shape: the per-stream shape, e.g. ``(16, 64, 64)`` for an SD3 latent.
        device: device of the result (defaults to the ids' device, else CPU).
        dtype: result dtype; the values are always computed in fp32.

    Returns:
        tensor of shape ``(*S, *shape)``. Row ``s`` is identical whichever other streams are drawn with it.
    """
    keys = stream_keys(seed, stream_ids, device=device)
    return normal_from_keys(keys, shape).to(dtype)
