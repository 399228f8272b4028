"""Compile-check of the hand-written CUDA kernels where no CUDA build of torch exists (CI, laptops with nvcc).

The kernels (csrc/cuda/branch_kernels.cu) include no torch header, so nvcc compiles them as they are; the binding
(csrc/cuda/register.cpp) is syntax-checked against torch's headers. On a machine with a CUDA torch the extension is
really built by setup.py and tested in test_ops.py instead.

The kernels are compiled to cubin for sm_80 and sm_90 with ``-Xptxas -v`` (tempflow.compilecheck.nvcc_check, the same
flags as setup.py): every kernel instantiation must compile without spills and within the shared memory limits; the
registers, spills and shared memory per kernel go into the table of ``python -m tempflow.compilecheck``
(bench/results/compile_targets.md)."""

import os
import re
import shutil
import subprocess
import sysconfig

import pytest

from tempflow import compilecheck

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVCC = shutil.which("nvcc")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(NVCC is None, reason="nvcc not found")]


def _cuda_include() -> str:
    """The CUDA toolkit's include folder: CUDA_HOME / CUDA_PATH, next to nvcc, or /usr/local/cuda."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    candidates += [os.path.dirname(os.path.dirname(os.path.realpath(NVCC))), "/usr/local/cuda"]
    for home in filter(None, candidates):
        if os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h")):
            return os.path.join(home, "include")
    pytest.skip("nvcc found but not the CUDA headers (set CUDA_HOME)")


def _run(cmd):
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def nvcc_results():
    """``branch_kernels.cu`` compiled for sm_80 and sm_90 (in parallel), one result per kernel instantiation."""
    return compilecheck.nvcc_check(compilecheck.TARGETS, NVCC)


@pytest.mark.parametrize("arch", compilecheck.TARGETS)
def test_kernels_compile_with_nvcc(nvcc_results, arch):
    results = [r for r in nvcc_results if r.target == arch]
    assert results and not any(r.error for r in results), "\n".join(r.error for r in results)
    problems = [f"{r.kernel}: {p}" for r in results for p in r.problems]
    assert not problems, "\n".join(problems)
    # every __global__ kernel of the file is instantiated (launched) and reported
    with open(compilecheck.CUDA_SOURCE) as f:
        kernels = set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)", f.read()))
    assert kernels and {r.kernel.split("<")[0] for r in results} == kernels
    for r in results:
        assert r.registers and r.spill_stores == 0 and r.spill_loads == 0, r
        assert r.shared <= compilecheck.SMEM_LIMIT[arch], r


_BROKEN_CU = {
    # 64 values live per thread under __launch_bounds__(1024, 2), i.e. at most 32 registers: ptxas spills
    "spill.cu": """
__global__ void __launch_bounds__(1024, 2) spill_kernel(const float* __restrict__ x, float* __restrict__ y, int n) {
  float v[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) v[i] = x[threadIdx.x + i * n];
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < 64; ++i) s += v[i] * v[(i * 7 + 3) % 64];
#pragma unroll
  for (int i = 0; i < 64; ++i) y[threadIdx.x + i * n] = v[i] / s;
}
""",
    # 64 KB of static shared memory: over the 48 KB that a block may declare statically
    "shared.cu": """
__global__ void big_shared_kernel(float* y) {
  __shared__ float buf[16384];
  buf[threadIdx.x] = y[threadIdx.x];
  __syncthreads();
  y[threadIdx.x] = buf[(threadIdx.x + 1) % 16384];
}
""",
}


def test_nvcc_check_catches_spills_and_shared_memory(tmp_path):
    for name, text in _BROKEN_CU.items():
        (tmp_path / name).write_text(text)
    spill = compilecheck.nvcc_check([90], NVCC, str(tmp_path / "spill.cu"))
    assert [r.kernel for r in spill] == ["spill_kernel"] and spill[0].spill_stores > 0
    assert spill[0].problems and spill[0].problems[0].startswith("spills"), spill[0].problems
    shared = compilecheck.nvcc_check([80], NVCC, str(tmp_path / "shared.cu"))
    assert len(shared) == 1 and "too much shared data" in shared[0].problems[0], shared[0].problems


def test_binding_compiles_against_torch_headers(tmp_path):
    from torch.utils.cpp_extension import include_paths

    cuda_include = _cuda_include()
    includes = [*include_paths(), cuda_include, sysconfig.get_paths()["include"], os.path.join(ROOT, "csrc")]
    # a CPU build of torch ships the c10/cuda headers but not the one its CMake generates: stand one in
    generated = "c10/cuda/impl/cuda_cmake_macros.h"
    if not any(os.path.exists(os.path.join(p, generated)) for p in includes):
        stub = tmp_path / generated
        stub.parent.mkdir(parents=True)
        stub.write_text("#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.insert(0, str(tmp_path))
    cxx = os.environ.get("CXX", "c++")
    cmd = [cxx, "-std=c++17", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=_C_cuda"]
    cmd += [f"-I{p}" for p in includes]
    _run([*cmd, os.path.join(ROOT, "csrc", "cuda", "register.cpp")])
