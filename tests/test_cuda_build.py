"""Compile-check of the hand-written CUDA kernels where no CUDA build of torch exists (CI, laptops with nvcc).

The kernels (csrc/cuda/branch_kernels.cu) include no torch header, so nvcc compiles them as they are; the binding
(csrc/cuda/register.cpp) is syntax-checked against torch's headers. On a machine with a CUDA torch the extension is
really built by setup.py and tested in test_ops.py instead."""

import os
import shutil
import subprocess
import sysconfig

import pytest

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


def test_kernels_compile_with_nvcc(tmp_path):
    src = os.path.join(ROOT, "csrc", "cuda", "branch_kernels.cu")
    out = tmp_path / "branch_kernels.o"
    cmd = [NVCC, "-std=c++17", "-O3", "--fmad=false", "-gencode=arch=compute_90,code=sm_90"]
    _run([*cmd, "-I", os.path.join(ROOT, "csrc"), "-c", src, "-o", str(out)])
    assert out.stat().st_size > 0


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
