import math

import pytest
import torch

from tempflow import _ext, ops, rng

# Random123's known-answer vectors for Philox4x32-10: (counter, key) -> output words.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter,key,expected", KAT, ids=["zeros", "ones", "pi"])
def test_philox_known_answers(counter, key, expected):
    t = [torch.tensor([c], dtype=torch.int64) for c in (*counter, *key)]
    out = rng.philox4x32(*t)
    assert [int(o) for o in out] == list(expected)


def test_uniform_conversion_matches_triton_formula():
    words = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1, 12345], dtype=torch.int64)
    u = rng.uniform_from_uint32(words)
    as_int32 = [w - 2**32 if w >= 2**31 else w for w in words.tolist()]
    folded = [~x if x < 0 else x for x in as_int32]
    expected = torch.tensor(folded, dtype=torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)
    assert torch.equal(u, expected)
    assert float(u.max()) < 1.0 and float(u.min()) >= 0.0


def test_statistics():
    z = rng.normal(7, torch.arange(64)[:, None], (8192,))
    assert z.dtype == torch.float32 and z.shape == (64, 8192)
    flat = z.double().reshape(-1)
    n = flat.numel()
    assert abs(flat.mean()) < 4 / math.sqrt(n)
    assert abs(flat.var() - 1) < 4 * math.sqrt(2 / n)
    assert abs((flat**3).mean()) < 4 * math.sqrt(15 / n)  # skewness of a normal is 0
    assert abs((flat**4).mean() - 3) < 4 * math.sqrt(96 / n)  # kurtosis 3
    # tail mass beyond 2 sigma: 4.55%
    assert abs((flat.abs() > 2).double().mean() - 0.0455) < 0.003


def test_streams_independent():
    ids = torch.tensor([[p, s, k, b] for p in range(2) for s in range(2) for k in range(3) for b in range(4)])
    z = rng.normal(3, ids, (4096,)).double()
    corr = torch.corrcoef(z)
    off = corr - torch.eye(len(ids), dtype=torch.float64)
    assert off.abs().max() < 5 / math.sqrt(4096)
    assert len({tuple(row[:4].tolist()) for row in z}) == len(ids)  # no two streams equal


def test_neighbouring_seeds_and_ids_differ():
    a = rng.normal(0, [0, 0, 0, 0], (256,))
    for seed, ids in [(1, [0, 0, 0, 0]), (0, [0, 0, 0, 1]), (0, [1, 0, 0, 0]), (0, [0, 0, 1, 0]), (0, [0, 0, 0])]:
        b = rng.normal(seed, ids, (256,))
        assert not torch.equal(a, b), (seed, ids)
    # the order of ids matters
    assert not torch.equal(rng.normal(0, [1, 2], (64,)), rng.normal(0, [2, 1], (64,)))


def test_repeatable_across_batch_layouts():
    ids = torch.tensor([[p, s, k, b] for p in range(3) for s in range(2) for k in (0, 5) for b in range(6)])
    full = rng.normal(11, ids, (4, 9, 7))
    perm = torch.randperm(len(ids))
    assert torch.equal(rng.normal(11, ids[perm], (4, 9, 7)), full[perm])
    chunks = torch.cat([rng.normal(11, part, (4, 9, 7)) for part in ids.split(5)])
    assert torch.equal(chunks, full)
    one = rng.normal(11, ids[17].tolist(), (4, 9, 7))
    assert torch.equal(one, full[17])
    # a (P, S, K, B) grid of ids gives the same rows as the flat list
    grid = ids.reshape(3, 2, 2, 6, 4)
    assert torch.equal(rng.normal(11, grid, (4, 9, 7)).reshape(full.shape), full)


def test_element_index_is_the_counter():
    keys = rng.stream_keys(5, torch.tensor([[1, 2], [3, 4]]))
    whole = rng.normal_from_keys(keys, (100,))
    tail = rng.normal_from_keys(keys, (40,), offset=60)
    assert torch.equal(whole[:, 60:], tail)
    # shape only changes the view, never the values
    assert torch.equal(rng.normal_from_keys(keys, (10, 10)).reshape(2, 100), whole)


def test_seed_tensor_and_dtype():
    ids = torch.tensor([[0, 1], [0, 2]])
    a = rng.normal(torch.tensor([4, 9]), ids, (16,))
    assert torch.equal(a[0], rng.normal(4, [0, 1], (16,)))
    assert torch.equal(a[1], rng.normal(9, [0, 2], (16,)))
    assert rng.normal(4, ids, (3,), dtype=torch.bfloat16).dtype == torch.bfloat16


def test_bad_input():
    with pytest.raises(ValueError, match="seed must be in"):
        rng.normal(-1, [0], (2,))
    with pytest.raises(TypeError, match="stream_ids must be integers"):
        rng.normal(0, torch.tensor([0.5]), (2,))
    with pytest.raises(ValueError, match="last dimension"):
        rng.normal(0, 3, (2,))


def test_large_offsets_and_keys_are_exact():
    keys = torch.tensor([2**63 - 1, -5, 0, 12345678901234])
    hi = rng.normal_from_keys(keys, (8,), offset=2**33 + 7)
    lo = rng.normal_from_keys(keys, (8,), offset=7)
    assert not torch.equal(hi, lo)  # the high word of the element index is part of the counter
    assert torch.isfinite(hi).all()


# ---- other implementations of the same stream --------------------------------------------------------------


def _close_to_last_bits(a: torch.Tensor, b: torch.Tensor):
    # Integers and uniforms are exact; log/cos of different math libraries may differ in the last bits.
    torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)


cpp = pytest.mark.skipif(not _ext.load("_C")[0], reason=f"C++ extension not built: {_ext.load('_C')[1]}")


@cpp
def test_cpp_matches_reference():
    keys = rng.stream_keys(123, torch.tensor([[p, k, b] for p in range(3) for k in range(4) for b in range(5)]))
    for n, offset in [(1, 0), (1000, 0), (4099, 3), (17, 2**32 + 1)]:
        ref = rng.normal_from_keys(keys, (n,), offset=offset)
        out = ops.philox_normal(keys, n, offset, backend="cpu")
        _close_to_last_bits(out, ref)
        assert (out == ref).double().mean() > 0.5  # most values agree to the bit


@cpp
def test_cpp_op_traces_with_torch_compile():
    keys = rng.stream_keys(1, torch.arange(6).reshape(3, 2))
    compiled = torch.compile(lambda k: ops.philox_normal(k, 33, backend="cpu") * 2.0, fullgraph=True)
    assert torch.equal(compiled(keys), 2.0 * ops.philox_normal(keys, 33, backend="cpu"))
    with torch._subclasses.fake_tensor.FakeTensorMode():
        fake = torch.ops.tempflow_cpu.philox_normal(torch.empty(5, dtype=torch.int64), 7)
        assert fake.shape == (5, 7) and fake.dtype == torch.float32


@cpp
def test_cpp_op_checks_arguments():
    with pytest.raises(RuntimeError, match="keys must be int64"):
        torch.ops.tempflow_cpu.philox_normal(torch.zeros(3, dtype=torch.int32), 4)
    with pytest.raises(RuntimeError, match="n must be >= 0"):
        torch.ops.tempflow_cpu.philox_normal(torch.zeros(3, dtype=torch.int64), -1)


triton_ok = pytest.mark.skipif(
    ops.backend_status("cpu")["triton"] != "", reason=f"triton unavailable: {ops.backend_status('cpu')['triton']}"
)


@triton_ok
def test_triton_tl_randn_matches_reference():
    keys = rng.stream_keys(99, torch.tensor([[0, 3, b] for b in range(4)]))
    ref = rng.normal_from_keys(keys, (1500,), offset=5)
    out = ops.philox_normal(keys, 1500, 5, backend="triton")
    _close_to_last_bits(out, ref)


@triton_ok
def test_triton_integer_stream_is_bit_exact():
    import triton
    import triton.language as tl

    @triton.jit
    def words(keys_ptr, out_ptr, n, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        col = tl.arange(0, BLOCK)
        key = tl.load(keys_ptr + row)
        c0, c1, c2, c3 = tl.randint4x(key, col.to(tl.int64))
        base = out_ptr + row * 4 * n
        mask = col < n
        tl.store(base + col, c0.to(tl.int64) & 0xFFFFFFFF, mask=mask)
        tl.store(base + n + col, c1.to(tl.int64) & 0xFFFFFFFF, mask=mask)
        tl.store(base + 2 * n + col, c2.to(tl.int64) & 0xFFFFFFFF, mask=mask)
        tl.store(base + 3 * n + col, c3.to(tl.int64) & 0xFFFFFFFF, mask=mask)

    keys = torch.tensor([0, 1, 2**62 + 12345, -7], dtype=torch.int64)
    n = 100
    out = torch.empty(len(keys), 4, n, dtype=torch.int64)
    words[(len(keys),)](keys, out, n, BLOCK=128)
    ref = torch.stack(rng.randint4x(keys.reshape(-1, 1), torch.arange(n)), dim=1)
    assert torch.equal(out, ref)


def test_explicit_backend_that_cannot_serve_raises(monkeypatch):
    keys = rng.stream_keys(0, torch.zeros(2, 1, dtype=torch.int64))
    with pytest.raises(ValueError, match="unknown tempflow backend"):
        ops.philox_normal(keys, 4, backend="fast")
    monkeypatch.setattr(ops, "_CPU_LOADED", False)
    monkeypatch.setattr(ops, "_CPU_REASON", "not built at install: test")
    with pytest.raises(RuntimeError, match="backend 'cpu' was requested"):
        ops.philox_normal(keys, 4, backend="cpu")
    monkeypatch.setenv("TEMPFLOW_BACKEND", "cpu")
    with pytest.raises(RuntimeError, match="TEMPFLOW_BACKEND"):
        ops.philox_normal(keys, 4)
    monkeypatch.setenv("TEMPFLOW_BACKEND", "auto")
    assert ops.resolve_backend("cpu") == "torch"  # automatic choice falls back quietly
    assert torch.equal(ops.philox_normal(keys, 4), rng.normal_from_keys(keys, (4,)))
