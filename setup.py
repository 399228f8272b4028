"""Build script: the optional C++ (CPU) and CUDA extensions of tempflow.

Metadata lives in pyproject.toml. This file only decides which compiled parts to build:

* ``tempflow._C``       C++ CPU kernels (csrc/cpu), OpenMP. Built when torch and a C++ compiler are present.
* ``tempflow._C_cuda``  CUDA kernels (csrc/cuda). Built only against a CUDA build of torch with nvcc.

Install with ``pip install --no-build-isolation -e .`` so the extension is compiled against the torch you
already have (torch is deliberately not a build requirement). Whatever cannot be built is skipped, the
package falls back to its pure-torch reference, and the reason is recorded in ``tempflow/_build_info.json``
(shown by ``tempflow doctor``).

Switches (environment variables):
  TEMPFLOW_SKIP_CPP_BUILD=1    do not build the C++ CPU extension
  TEMPFLOW_SKIP_CUDA_BUILD=1   do not build the CUDA extension
  TEMPFLOW_CUDA_ARCHS="90;80"  compute capabilities for the CUDA build (default: 80;90)
  TEMPFLOW_REQUIRE_EXT=1       fail the install instead of skipping an extension that does not build
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
INFO_NAME = "_build_info.json"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


info: dict = {"python": sys.version.split()[0], "extensions": {}}
ext_modules = []
cmdclass = {}

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
except Exception as exc:  # torch missing or broken: pure-Python install
    torch = None
    reason = f"torch is not importable at build time ({type(exc).__name__}: {exc}); install torch first and "
    reason += "reinstall with `pip install --no-build-isolation -e .`"
    info["extensions"]["_C"] = {"built": False, "reason": reason}
    info["extensions"]["_C_cuda"] = {"built": False, "reason": reason}

if torch is not None:
    info["torch"] = torch.__version__
    cxx = os.environ.get("CXX", "c++")
    cpu_sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    if _flag("TEMPFLOW_SKIP_CPP_BUILD"):
        info["extensions"]["_C"] = {"built": False, "reason": "TEMPFLOW_SKIP_CPP_BUILD is set"}
    elif shutil.which(cxx) is None:
        info["extensions"]["_C"] = {"built": False, "reason": f"no C++ compiler found (looked for {cxx!r})"}
    elif not cpu_sources:
        info["extensions"]["_C"] = {"built": False, "reason": "no sources under csrc/cpu"}
    else:
        openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
        ext_modules.append(
            CppExtension(
                "tempflow._C",
                cpu_sources,
                include_dirs=[os.path.join(ROOT, "csrc")],
                extra_compile_args=["-O3", "-std=c++17", "-ffp-contract=off", "-fno-math-errno", *openmp],
                extra_link_args=openmp,
            )
        )
        info["extensions"]["_C"] = {"built": True, "reason": ""}

    cuda_sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    cuda_sources += _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
    from torch.utils.cpp_extension import CUDA_HOME

    if _flag("TEMPFLOW_SKIP_CUDA_BUILD"):
        cuda_reason = "TEMPFLOW_SKIP_CUDA_BUILD is set"
    elif torch.version.cuda is None:
        cuda_reason = f"torch {torch.__version__} is a CPU build (no CUDA)"
    elif CUDA_HOME is None:
        cuda_reason = "nvcc / CUDA_HOME not found"
    elif not cuda_sources:
        cuda_reason = "no sources under csrc/cuda yet"
    else:
        cuda_reason = ""
    if cuda_reason:
        info["extensions"]["_C_cuda"] = {"built": False, "reason": cuda_reason}
    else:
        archs = os.environ.get("TEMPFLOW_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a.strip()]
        ext_modules.append(
            CUDAExtension(
                "tempflow._C_cuda",
                cuda_sources,
                include_dirs=[os.path.join(ROOT, "csrc")],
                # --fmad=false: `mean + std * eps` must round like the torch reference (no FMA contraction)
                extra_compile_args={
                    "cxx": ["-O3", "-std=c++17", "-ffp-contract=off"],
                    "nvcc": ["-O3", "-std=c++17", "--fmad=false", *gencode],
                },
            )
        )
        info["extensions"]["_C_cuda"] = {"built": True, "reason": ""}

    class OptionalBuildExtension(BuildExtension):
        """Build each extension; a failure is recorded and skipped unless TEMPFLOW_REQUIRE_EXT is set."""

        def build_extension(self, ext):
            short = ext.name.rsplit(".", 1)[-1]
            try:
                super().build_extension(ext)
            except Exception as exc:
                if _flag("TEMPFLOW_REQUIRE_EXT"):
                    raise
                msg = f"build failed: {type(exc).__name__}: {exc}"
                info["extensions"][short] = {"built": False, "reason": msg}
                print(f"tempflow: skipping {ext.name}: {msg}", file=sys.stderr)
            _write_info(self)

        def run(self):
            super().run()
            _write_info(self)

    cmdclass["build_ext"] = OptionalBuildExtension.with_options(no_python_abi_suffix=False)


def _write_info(cmd=None) -> None:
    """Record what was built and why anything was skipped, next to the package (source and build tree)."""
    targets = {os.path.join(ROOT, "tempflow")}
    build_lib = getattr(cmd, "build_lib", None)
    if build_lib and not getattr(cmd, "inplace", False):
        targets.add(os.path.join(build_lib, "tempflow"))
    for folder in targets:
        if os.path.isdir(folder):
            with open(os.path.join(folder, INFO_NAME), "w") as fh:
                json.dump(info, fh, indent=2, sort_keys=True)


_write_info()
setup(ext_modules=ext_modules, cmdclass=cmdclass, package_data={"tempflow": [INFO_NAME, "assets/*"]})
