"""The compile check for real NVIDIA targets (tempflow.compilecheck): every Triton kernel of kernels/, in every
specialisation that tempflow.ops launches, compiled to cubin for sm_80 and sm_90 without a GPU.

The test session interprets Triton kernels (conftest.py sets TRITON_INTERPRET=1), and the interpreter never lowers a
kernel, so the compile check runs in subprocesses with TRITON_INTERPRET=0. The deliberately broken kernels below run
without complaint in the interpreter (this process) and are rejected by the compile check (a subprocess)."""

import json
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from tempflow import compilecheck  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = {"_sample_kernel", "_logp_kernel", "_logp_backward_kernel", "_philox_normal_kernel"}


# ---- deliberately broken kernels (module level: the subprocess imports this file to compile them) --------------------


@triton.jit
def _broken_accumulate_kernel(alpha_ptr, a_ptr, out_ptr, D, K, BLOCK: tl.constexpr):
    """sum_k alpha[k] a[k, :], with the accumulator started as a scalar: the loop-carried ``g`` changes type from
    fp32 to a BLOCK-vector. Python (the interpreter) broadcasts; the compiler rejects it."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    g = 0.0  # the bug: tl.zeros([BLOCK], dtype=tl.float32) was meant
    for k in range(K):
        g += tl.load(alpha_ptr + k) * tl.load(a_ptr + k * D + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, g, mask=mask)


@triton.jit
def _fixed_accumulate_kernel(alpha_ptr, a_ptr, out_ptr, D, K, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    g = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(K):
        g += tl.load(alpha_ptr + k) * tl.load(a_ptr + k * D + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, g, mask=mask)


@triton.jit
def _spilling_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
    """8192 values kept live across a reduction by one warp: 256 per thread, more than the 255 registers."""
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    tl.store(out_ptr + offs, x / tl.sum(x * x, axis=0))


@triton.jit
def _transpose_kernel(x_ptr, out_ptr, N: tl.constexpr):
    """An N x N fp32 transpose staged through shared memory: 256 KB for N = 256, over both targets' limits."""
    r = tl.arange(0, N)
    x = tl.load(x_ptr + r[:, None] * N + r[None, :])
    tl.store(out_ptr + r[:, None] * N + r[None, :], tl.trans(x))


def _accumulate(kernel, D=1000, K=3):
    alpha, a, out = torch.randn(K), torch.randn(K, D), torch.full((D,), float("nan"))
    kernel[(triton.cdiv(D, 1024),)](alpha, a, out, D, K, BLOCK=1024, num_warps=4)
    return out, (alpha[:, None] * a).sum(0)


def _spill(n=8192):
    x, out = torch.randn(n), torch.full((n,), float("nan"))
    _spilling_kernel[(1,)](x, out, BLOCK=n, num_warps=1)
    return out, x / (x * x).sum()


def _transpose(n=256):
    x, out = torch.randn(n, n), torch.full((n, n), float("nan"))
    _transpose_kernel[(1,)](x, out, N=n, num_warps=8)
    return out, x.t()


BROKEN = {
    "broken_accumulate": lambda: _accumulate(_broken_accumulate_kernel),
    "fixed_accumulate": lambda: _accumulate(_fixed_accumulate_kernel),
    "spill": _spill,
    "transpose": _transpose,
}


# ---- subprocesses with TRITON_INTERPRET=0 ------------------------------------------------------------------------

_SCRIPT = """
import importlib.util, json, sys
from tempflow import compilecheck as cc
spec = importlib.util.spec_from_file_location("compile_targets_kernels", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
launches = []
for name, call in mod.BROKEN.items():
    with cc.intercept_launches() as calls:
        call()
    launches += [cc.Spec(fn, name, args, kwargs) for fn, args, kwargs in calls]
out = {}
for r in cc.compile_all(launches, cc.TARGETS, jobs=int(sys.argv[2])):
    out.setdefault(r.variant.split(";")[0], []).append(r.row())
specs = cc.triton_specs()
desc = {id(s): s.describe()[0] for s in specs}
out["coverage"] = {
    "all": cc.coverage_problems(specs),
    "no RETURN_MEAN=1": cc.coverage_problems([s for s in specs if "RETURN_MEAN=1" not in desc[id(s)]]),
    "no fp16": cc.coverage_problems([s for s in specs if not desc[id(s)].startswith("fp16")]),
    "no philox": cc.coverage_problems([s for s in specs if s.name != "_philox_normal_kernel"]),
}
print(json.dumps(out))
"""


def _env():
    return {**os.environ, "TRITON_INTERPRET": "0"}


def _jobs() -> str:
    return str(min(os.cpu_count() or 1, 8))


def _json(done) -> dict:
    assert done.stdout.strip(), f"no output (exit {done.returncode})\n{done.stderr[-4000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def check(tmp_path_factory):
    """``python -m tempflow.compilecheck`` over kernels/ (Triton only: test_cuda_build.py does csrc/cuda)."""
    out = tmp_path_factory.mktemp("compile_targets") / "compile_targets"
    cmd = [sys.executable, "-m", "tempflow.compilecheck", "--no-nvcc", "--json", "--jobs", _jobs(), "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    return done, _json(done), out


@pytest.fixture(scope="module")
def broken():
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, os.path.abspath(__file__), _jobs()],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return _json(done)


# ---- the kernels of kernels/ ---------------------------------------------------------------------------------------


def test_every_launched_specialisation_compiles_for_sm80_and_sm90(check):
    done, summary, _ = check
    results = summary["results"]
    failed = [f"{r['kernel']} [{r['variant']}] sm_{r['target']}: {p}" for r in results for p in r["problems"]]
    assert not failed, "\n".join(failed) + "\n" + done.stderr[-4000:]
    assert done.returncode == 0, done.stderr[-4000:]
    assert {(r["kernel"], r["target"]) for r in results} == {(k, t) for k in KERNELS for t in compilecheck.TARGETS}
    for r in results:
        assert r["registers"] and r["spill_stores"] is not None and r["shared"] is not None, r
        assert r["shared"] <= compilecheck.SMEM_LIMIT[r["target"]]
    # the branch kernels' enable_fp_fusion=False reaches the compiler (`mean + std * eps` rounds like torch)
    assert all(r["launch"].endswith("fp fusion off") for r in results if r["kernel"] != "_philox_normal_kernel")


def test_specialisations_cover_every_kernel_flag_and_dtype(check):
    _, summary, _ = check
    assert summary["coverage"] == []
    variants = {r["variant"] for r in summary["results"] if r["kernel"] == "_sample_kernel"}
    for flags in ("HAS_NOISE=0 RETURN_MEAN=0", "HAS_NOISE=0 RETURN_MEAN=1", "HAS_NOISE=1 RETURN_MEAN=0"):
        for dtype in ("fp32", "bf16", "fp16"):
            assert any(v.startswith(f"{dtype};") and flags in v for v in variants), (dtype, flags, variants)
    assert any("K=1" in v for v in variants)  # Triton specialises K == 1 (the plain Flow-GRPO step)


def test_table_is_written(check):
    _, summary, out = check
    table = (out.parent / (out.name + ".md")).read_text()
    assert "| kernel | variant | target | launch | registers | spills (st/ld bytes) | shared bytes | seconds |" in table
    rows = (out.parent / (out.name + ".jsonl")).read_text().splitlines()
    assert len(rows) == len(summary["results"]) == table.count("\n| _")


def test_coverage_check_catches_what_the_cases_leave_out(broken):
    coverage = broken["coverage"]
    assert coverage["all"] == []
    assert any("RETURN_MEAN" in p and "[True]" not in p for p in coverage["no RETURN_MEAN=1"]), coverage
    assert any("_sample_kernel: pointer x_ptr" in p for p in coverage["no fp16"]), coverage
    assert any("kernel _philox_normal_kernel is launched by none" in p for p in coverage["no philox"]), coverage


# ---- deliberately broken kernels ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_interpreter_runs_the_broken_kernels(name):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton interpreter is off in this session")
    out, want = BROKEN[name]()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def _problems(broken, name):
    rows = broken[name]
    assert {r["target"] for r in rows} == set(compilecheck.TARGETS)
    return {r["target"]: r["problems"] for r in rows}, rows


def test_compile_check_rejects_a_loop_carried_type_change(broken):
    problems, rows = _problems(broken, "broken_accumulate")
    for target, found in problems.items():
        assert found and found[0].startswith("compile error"), (target, found)
    assert all("Loop-carried variable g" in r["error"] for r in rows), [r["error"][-400:] for r in rows]
    fixed, _ = _problems(broken, "fixed_accumulate")
    assert fixed == {t: [] for t in compilecheck.TARGETS}


def test_compile_check_flags_spills(broken):
    problems, rows = _problems(broken, "spill")
    assert all(any(p.startswith("spills") for p in found) for found in problems.values()), problems
    assert all(r["registers"] >= 255 for r in rows)


def test_compile_check_flags_shared_memory_over_the_limit(broken):
    problems, rows = _problems(broken, "transpose")
    assert all(r["shared"] == 256 * 256 * 4 for r in rows)
    assert all(any(p.startswith("shared memory") for p in found) for found in problems.values()), problems


# ---- pieces ------------------------------------------------------------------------------------------------------


def test_parse_ptxas_report():
    log = (
        "ptxas info    : 52 bytes gmem\n"
        "ptxas info    : Compiling entry function '_k' for 'sm_90a'\n"
        "ptxas info    : Function properties for _k\n"
        "    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
        "ptxas info    : Used 72 registers, used 1 barriers, 32 bytes smem, 400 bytes cmem[0]\n"
    )
    assert compilecheck.parse_ptxas(log) == {
        "_k": {"smem": 32, "stack": 8, "spill_stores": 4, "spill_loads": 4, "registers": 72}
    }


def test_shared_memory_limits_are_the_per_block_opt_in_maxima():
    # 163 KB on A100 (sm_80), 227 KB on H100 (sm_90): cudaDevAttrMaxSharedMemoryPerBlockOptin
    assert compilecheck.SMEM_LIMIT == {80: 166912, 90: 232448}
    r = compilecheck.Result("k", "", 80, registers=32, spill_stores=0, spill_loads=0, shared=166913, threads=128)
    assert r.problems == ["shared memory 166913 bytes > sm_80's per-block limit 166912"]
    assert compilecheck.Result("k", "", 90, registers=32, spill_stores=0, spill_loads=0, shared=166913).problems == []
