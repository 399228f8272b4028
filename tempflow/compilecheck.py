"""Compile check of the fused kernels for real NVIDIA targets, on a machine without a GPU.

Every ``@triton.jit`` kernel of ``kernels/`` is compiled to a cubin for sm_80 and sm_90, in every specialisation that
the public ops of :mod:`tempflow.ops` launch; ``csrc/cuda/branch_kernels.cu`` is compiled with ``nvcc -Xptxas -v``
for the same targets. A target fails on a compile error, on register spills, on shared memory over the target's
per-block limit, or on a block that needs more than the SM's register file. The results go to a table (kernel,
target, registers, spills, shared bytes, seconds)::

    python -m tempflow.compilecheck --out bench/results/compile_targets     # writes .md and .jsonl, exits 1 on failure

The Triton interpreter (``TRITON_INTERPRET=1``, which the tests use) never lowers a kernel, so it accepts kernels that
the real compiler rejects; this check is what CI runs instead of a GPU. It must run in a process where
``TRITON_INTERPRET`` is ``0`` when triton is first imported (``python -m tempflow.compilecheck`` sets it; a test
session interprets, so tests run the check in a subprocess).

Written against triton 3.9's compiler API (``triton.compile``, ``ASTSource``, ``GPUTarget``, the binder of
``triton.runtime.jit`` and ``JITFunction._pack_args``, ``knobs.nvidia.dump_ptxas_log``); registers and spills are read
from the ``ptxas -v`` report that Triton prints when asked, shared memory from the compiled metadata plus the report's
static ``smem``.

How the specialisations are found: :data:`VARIANTS` x :func:`_launch_cases` call the public ops (``branch_step``
with noise and with keys, with and without the mean; ``branch_logp_kl`` with and without a reference velocity, and
its backward; ``philox_normal``) with CPU tensors and the ``triton`` backend, and the Triton launch
is intercepted (``JITFunction.run``): nothing runs, but Triton's own binder turns each launch's arguments into the
signature, constexprs, alignment / ``== 1`` attributes and options (``num_warps``, ``enable_fp_fusion``, ...) that a
GPU launch would compile. :func:`coverage_problems` then checks that every kernel of ``kernels/`` was launched, every
boolean constexpr was seen both ways, and every pointer that takes the caller's dtype was seen as fp32, bf16 and fp16,
so a new flag or kernel cannot be silently left out.

Shared memory limits are the per-block opt-in maxima: 163 KB on sm_80 (A100) and 227 KB on sm_90 (H100), of the SM's
164 / 228 KB (CUDA reserves 1 KB per block): NVIDIA Ampere Tuning Guide, 1.4.2.3 "Unified Shared Memory/L1/Texture
Cache" (https://docs.nvidia.com/cuda/ampere-tuning-guide/) and NVIDIA Hopper Tuning Guide, "Unified Shared
Memory/L1/Texture Cache" (https://docs.nvidia.com/cuda/hopper-tuning-guide/); the CUDA C++ Programming Guide's table
of technical specifications per compute capability gives the same ("maximum amount of shared memory per thread
block"). These equal ``cudaDevAttrMaxSharedMemoryPerBlockOptin`` on an A100 (166912) and an H100 (232448).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = (80, 90)
# Per-block opt-in shared memory maxima in bytes (see the module docstring for the sources).
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
REGS_PER_SM = 65536  # 64K 32-bit registers per SM on sm_80 and sm_90
CUDA_SOURCE = os.path.join(ROOT, "csrc", "cuda", "branch_kernels.cu")
CUDA_THREADS = 256  # kThreads of branch_kernels.cu (every kernel is __launch_bounds__(kThreads))
# nvcc flags of setup.py's CUDAExtension (torch adds its COMMON_NVCC_FLAGS, see _nvcc_flags)
NVCC_FLAGS = ["-O3", "-std=c++17", "--fmad=false"]


# Problems this check found that are accepted for now: reported as "known" in the table, not failing the check. Each
# entry: kernel, target, a regex on the variant, the kind of problem, the most spilled bytes tolerated, and why. Delete
# an entry to make the check strict again.
KNOWN_PROBLEMS = [
    {
        "kernel": "_sample_kernel",
        "target": 90,
        "variant": r"HAS_NOISE=0 RETURN_MEAN=1;(?!.*D%16=0).*\bK=1\b",
        "problem": "spills",
        "max_spill_bytes": 16,
        "why": "keys path with the mean, K = 1 and D not a multiple of 16: ptxas 13.4 (the triton 3.9 wheel's "
        "ptxas-blackwell, which Triton uses for sm_90) spills 4 bytes under Triton's --regAllocOptLevel=2 at 72 "
        "registers; ptxas 12.9 and 13.0 do not spill on the same PTX",
    },
]


@dataclasses.dataclass
class Result:
    """One kernel (one specialisation / template instantiation) compiled for one target."""

    kernel: str
    variant: str
    target: int
    launch: str = ""  # launch options that shape the code: warps (threads), fp fusion
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack: int | None = None
    shared: int | None = None  # static + dynamic shared memory per block, bytes
    threads: int | None = None
    seconds: float = 0.0
    error: str = ""
    source: str = "triton"

    def issues(self) -> list[str]:
        """Everything that fails the check, known problems included."""
        if self.error:
            lines = [line.strip() for line in self.error.strip().splitlines() if line.strip()]
            errors = [line for line in lines if re.search(r"\berror\b", line, re.I) and "exited" not in line]
            return [f"compile error: {(errors or lines or ['?'])[0 if errors else -1]}"]
        out = []
        if self.registers is None:
            out.append("no register count in the ptxas report")
        if self.spill_stores or self.spill_loads:
            out.append(f"spills: {self.spill_stores} bytes stored, {self.spill_loads} bytes loaded")
        limit = SMEM_LIMIT.get(self.target)
        if self.shared is not None and limit is not None and self.shared > limit:
            out.append(f"shared memory {self.shared} bytes > sm_{self.target}'s per-block limit {limit}")
        if self.registers is not None and self.threads and self.registers * self.threads > REGS_PER_SM:
            out.append(f"{self.registers} registers x {self.threads} threads > {REGS_PER_SM} registers per SM")
        return out

    def _is_known(self, issue: str) -> bool:
        for k in KNOWN_PROBLEMS:
            if (k["kernel"], k["target"]) != (self.kernel, self.target) or not issue.startswith(k["problem"]):
                continue
            spilled = max(self.spill_stores or 0, self.spill_loads or 0)
            if re.search(k["variant"], self.variant) and spilled <= k.get("max_spill_bytes", 0):
                return True
        return False

    @property
    def problems(self) -> list[str]:
        """Why this result fails the check (empty when it passes)."""
        return [i for i in self.issues() if not self._is_known(i)]

    @property
    def known(self) -> list[str]:
        """Failures accepted by :data:`KNOWN_PROBLEMS`."""
        return [i for i in self.issues() if self._is_known(i)]

    def row(self) -> dict:
        return {**dataclasses.asdict(self), "problems": self.problems, "known": self.known}


# ---- ptxas reports -------------------------------------------------------------------------------------------------

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '([^']+)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(log: str) -> dict[str, dict]:
    """``ptxas -v`` report -> ``{entry: {registers, stack, spill_stores, spill_loads, smem}}`` (static smem)."""
    out: dict[str, dict] = {}
    cur = None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            cur = out.setdefault(m.group(1), {"smem": 0})
        elif cur is None:
            continue
        elif m := _PROPS.search(line):
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = map(int, m.groups())
        elif m := _USED.search(line):
            cur["registers"] = int(m.group(1))
            if s := _SMEM.search(line):
                cur["smem"] = int(s.group(1))
    return out


# ---- Triton: specialisations from the launchers ------------------------------------------------------------------


@dataclasses.dataclass
class Spec:
    """One compilation of one kernel: what ``JITFunction.run`` would hand to ``triton.compile`` for a launch."""

    fn: object  # the JITFunction
    label: str
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        return self.fn.fn.__name__

    def pack(self, arch: int):
        """``(signature, constexprs, attrs, options)`` for ``arch``, by Triton's own binder (as a launch does)."""
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature

        backend = make_backend(GPUTarget("cuda", arch, 32))
        binder = create_function_from_signature(self.fn.signature, self.fn.params, backend)
        kwargs = dict(self.kwargs)
        kwargs.setdefault("debug", getattr(self.fn, "debug", None) or False)
        bound, specialization, options = binder(*self.args, **kwargs)
        options, signature, constexprs, attrs = self.fn._pack_args(backend, kwargs, bound, specialization, options)
        return signature, constexprs, attrs, options

    def key(self) -> str:
        signature, constexprs, attrs, options = self.pack(TARGETS[-1])
        options = {k: v for k, v in options.__dict__.items() if k != "extern_libs"}
        return json.dumps(
            [self.name, signature, sorted(map(str, constexprs.items())), str(attrs), options], default=str
        )

    def describe(self) -> tuple[str, str]:
        """``(variant, launch)``: flags, dtypes and integer specialisations; warps and fp fusion."""
        signature, constexprs, attrs, options = self.pack(TARGETS[-1])
        names = self.fn.arg_names
        flags = [f"{names[i[0]]}={int(v)}" for i, v in sorted(constexprs.items()) if isinstance(v, bool)]
        ints = []
        for i, name in enumerate(names):
            ty = signature[name]
            if ty == "constexpr" and (i,) in constexprs and not isinstance(constexprs[(i,)], bool):
                if not self.fn.params[i].is_constexpr:
                    ints.append(f"{name}={constexprs[(i,)]}")  # an int specialised by value (== 1)
            elif ty in ("i32", "i64") and any("divisibility" in str(a) for a in attrs.get((i,), [])):
                ints.append(f"{name}%16=0")
        variant = "; ".join(filter(None, [self.label, " ".join(flags), " ".join(ints)]))
        fusion = "on" if options.enable_fp_fusion else "off"
        if "enable_fp_fusion" not in self.kwargs:
            fusion += " (Triton's default)"
        launch = f"{options.num_warps} warps, fp fusion {fusion}"
        return variant, launch


@contextlib.contextmanager
def intercept_launches():
    """Within the block, ``kernel[grid](...)`` records ``(kernel, args, kwargs)`` in the yielded list and runs
    nothing (no GPU or driver is needed)."""
    from triton.runtime.jit import JITFunction

    calls: list[tuple] = []
    real = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        calls.append((self, args, kwargs))

    JITFunction.run = record
    try:
        yield calls
    finally:
        JITFunction.run = real


# The public ops are called with these shapes and dtypes. "typical": K = 6 branches, D = 4 x 32 x 32 = 4096 (a multiple
# of 16: aligned, vectorised loads; 4 blocks of 1024); "edge": K = 1 (Triton specialises an int argument == 1), an odd
# D = 1000 (one block, no divisibility). Dtypes: (state / noise / actions, velocity / reference velocity); "mixed" is
# the trainer's case: fp32 states and samples, a bf16 model velocity.
SHAPES = {"typical": (2, 6, (4, 32, 32)), "edge": (3, 1, (10, 10, 10))}
DTYPES = {"fp32": ("float32", "float32"), "bf16": ("bfloat16", "bfloat16"), "fp16": ("float16", "float16")}
DTYPES["mixed"] = ("float32", "bfloat16")
VARIANTS = [("typical", "fp32"), ("typical", "bf16"), ("typical", "fp16"), ("edge", "mixed")]


def _launch_cases(shape: str, dtypes: str) -> list[tuple[str, Callable[[], object]]]:
    """``(label, call)`` for every way the public ops launch a Triton kernel, with inputs of ``shape`` / ``dtypes``."""
    import torch

    from . import ops, rng, sde

    b, k, latent = SHAPES[shape]
    ts, tv = (getattr(torch, name) for name in DTYPES[dtypes])
    table = sde.sde_table(sde.time_grid(10, shift=3.0), "flow-grpo", 0.7)
    step = torch.arange(b) % 9
    x = torch.randn(b, *latent).to(ts)
    v = torch.randn(b, *latent).to(tv)
    noise = torch.randn(b, k, *latent).to(ts)
    keys = rng.stream_keys(0, torch.tensor([[[p, 0, 2, j] for j in range(k)] for p in range(b)]))
    d = x[0].numel()
    label = f"{dtypes}" if shape == "typical" else f"{dtypes} {shape}"

    def sample(with_noise: bool, return_mean: bool):
        given = {"noise": noise} if with_noise else {"keys": keys}
        return lambda: ops.branch_step(x, v, step, table, k, **given, return_mean=return_mean, backend="triton")

    def logp_kl(with_ref: bool):
        def call():
            vv = v.clone().requires_grad_(True)
            ref = torch.randn(b, *latent).to(tv) if with_ref else None
            logp, kl = ops.branch_logp_kl(vv, x, noise, step, table, ref, backend="triton")
            (logp.sum() + kl.sum()).backward()  # the backward kernel

        return call

    cases = [(label, sample(n, m)) for n in (True, False) for m in (False, True)]
    cases += [(label, logp_kl(r)) for r in (False, True)]
    offset = 0 if shape == "typical" else d  # a continuation of the stream, not a multiple of 16
    cases.append((shape, lambda: ops.philox_normal(keys.reshape(-1), d, offset, backend="triton")))
    return cases


def triton_specs(variants: Iterable[tuple[str, str]] = VARIANTS) -> list[Spec]:
    """The distinct compilations that the public ops need, recorded from their Triton launches (see module doc)."""
    from . import kernels, ops

    if kernels.INTERPRET:
        raise RuntimeError("the compile check needs TRITON_INTERPRET=0 when triton is first imported")
    specs: dict[str, Spec] = {}
    status = ops._triton_status
    ops._triton_status = lambda device: ""  # let the triton backend take CPU tensors: the launches are recorded only
    try:
        for shape, dtypes in variants:
            for label, call in _launch_cases(shape, dtypes):
                with intercept_launches() as calls:
                    call()
                if not calls:
                    raise RuntimeError(f"case {label!r} launched no Triton kernel")
                for fn, args, kwargs in calls:
                    spec = Spec(fn, label, args, kwargs)
                    specs.setdefault(spec.key(), spec)
    finally:
        ops._triton_status = status
    return list(specs.values())


def kernel_functions() -> dict[str, object]:
    """Every ``@triton.jit`` function of ``kernels/`` (the package ``tempflow.kernels``), by name."""
    import importlib
    import pkgutil

    from triton.runtime.jit import JITFunction

    from . import kernels

    found = {}
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"{kernels.__name__}.{info.name}")
        for name, obj in vars(module).items():
            if isinstance(obj, JITFunction) and obj.fn.__module__ == module.__name__:
                found[name] = obj
    return found


def coverage_problems(specs: list[Spec]) -> list[str]:
    """What the recorded launches leave out: kernels never launched (helpers called from a launched kernel are
    compiled with it), boolean constexprs seen one way only, caller-typed pointers not seen as fp32, bf16 and fp16."""
    problems = []
    launched = {s.name: s.fn for s in specs}
    sources = {name: fn.src for name, fn in launched.items()}
    for name in kernel_functions():
        called = any(re.search(rf"\b{re.escape(name)}\s*\(", src) for src in sources.values())
        if name not in launched and not called:
            problems.append(f"kernel {name} is launched by none of the compile-check cases (tempflow.compilecheck)")
    floats = {"*fp32", "*bf16", "*fp16"}
    for name, fn in launched.items():
        packed = [s.pack(TARGETS[-1]) for s in specs if s.name == name]
        for i, param in enumerate(fn.params):
            pname = fn.arg_names[i]
            if param.is_constexpr:
                seen = {c[(i,)] for _, c, _, _ in packed}
                if any(isinstance(v, bool) for v in seen) and seen != {False, True}:
                    problems.append(f"{name}: constexpr {pname} only compiled as {sorted(seen)}")
            else:
                types = {sig[pname] for sig, _, _, _ in packed}
                if types & {"*bf16", "*fp16"} and not floats <= types:
                    problems.append(f"{name}: pointer {pname} only compiled as {sorted(types)}")
    return problems


def compile_spec(spec: Spec, arch: int) -> Result:
    """Compile one specialisation to a cubin for ``sm_{arch}`` and read registers / spills from the ptxas report."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    variant, launch = spec.describe()
    res = Result(spec.name, variant, arch, launch)
    knobs.nvidia.dump_ptxas_log = True  # make_cubin prints the `ptxas -v` report
    knobs.compilation.always_compile = True
    signature, constexprs, attrs, options = spec.pack(arch)
    res.threads = options.num_warps * 32 * options.num_ctas
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(
                ASTSource(spec.fn, signature, constexprs, attrs),
                target=GPUTarget("cuda", arch, 32),
                options=options.__dict__,
            )
    except Exception as exc:  # CompilationError, PTXASError, MLIR pass failures
        res.error = f"{type(exc).__name__}: {exc}"
        res.seconds = time.perf_counter() - start
        return res
    res.seconds = time.perf_counter() - start
    report = parse_ptxas(log.getvalue()).get(kernel.metadata.name, {})
    res.registers = report.get("registers")
    res.stack, res.spill_stores, res.spill_loads = (report.get(k) for k in ("stack", "spill_stores", "spill_loads"))
    res.shared = (kernel.metadata.shared or 0) + report.get("smem", 0)
    return res


_WORK: list[tuple[Spec, int]] = []


def _compile_job(i: int) -> Result:
    return compile_spec(*_WORK[i])


def compile_all(specs: list[Spec], targets: Iterable[int] = TARGETS, jobs: int = 1) -> list[Result]:
    """Compile every spec for every target (in a fresh Triton cache); ``jobs`` > 1 forks worker processes (Linux)."""
    work = [(s, t) for s in specs for t in targets]
    saved = os.environ.get("TRITON_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="tempflow-compilecheck-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        try:
            if jobs <= 1 or len(work) < 2:
                return [compile_spec(s, t) for s, t in work]
            import multiprocessing

            _WORK[:] = work
            with multiprocessing.get_context("fork").Pool(min(jobs, len(work))) as pool:
                return pool.map(_compile_job, range(len(work)), chunksize=1)
        finally:
            _WORK.clear()
            if saved is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = saved


def check_launches(
    call: Callable[[], object], label: str = "", targets: Iterable[int] = TARGETS, jobs: int = 1
) -> list[Result]:
    """Compile, for ``targets``, whatever Triton kernels ``call()`` launches (for kernels outside ``kernels/``)."""
    with intercept_launches() as calls:
        call()
    return compile_all([Spec(fn, label, args, kwargs) for fn, args, kwargs in calls], targets, jobs)


# ---- nvcc --------------------------------------------------------------------------------------------------------


def find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _nvcc_flags() -> list[str]:
    """setup.py's nvcc flags plus those torch's CUDAExtension adds (``-D__CUDA_NO_HALF_OPERATORS__`` ...)."""
    try:
        from torch.utils.cpp_extension import COMMON_NVCC_FLAGS
    except Exception:  # pragma: no cover - torch without cpp_extension
        COMMON_NVCC_FLAGS = []
    return [*NVCC_FLAGS, *COMMON_NVCC_FLAGS]


def _demangle(names: list[str], nvcc: str) -> dict[str, str]:
    beside = os.path.join(os.path.dirname(nvcc), "cu++filt")
    tool = beside if os.path.exists(beside) else shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    done = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    out = done.stdout.splitlines() if done.returncode == 0 else names
    return dict(zip(names, out if len(out) == len(names) else names, strict=True))


_TYPES = {"__nv_bfloat16": "bf16", "__half": "fp16", "float": "fp32"}


def _short(name: str) -> str:
    """``void tempflow::cuda::(anonymous namespace)::sample_kernel<float, __half, float>(...)`` ->
    ``sample_kernel<fp32, fp16, fp32>`` (the mangled name when no demangler was found)."""
    m = re.search(r"(\w+)(<[^()]*>)?\(", name)
    if not m:
        return name
    args = m.group(2) or ""
    for long, short in _TYPES.items():
        args = re.sub(rf"\b{long}\b", short, args)
    return m.group(1) + args


def nvcc_check(targets: Iterable[int] = TARGETS, nvcc: str | None = None, source: str = CUDA_SOURCE) -> list[Result]:
    """Compile ``source`` to a cubin per target with ``-Xptxas -v`` (the targets in parallel): one result per kernel
    instantiation and target (``seconds``: the whole file's compile time for that target), or one error result per
    target that fails to compile."""
    from concurrent.futures import ThreadPoolExecutor

    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (set CUDA_HOME)")
    base = os.path.basename(source)

    def build(arch: int, tmp: str) -> list[Result]:
        cmd = [nvcc, *_nvcc_flags(), f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v", "-cubin"]
        cmd += ["-I", os.path.join(ROOT, "csrc"), source, "-o", os.path.join(tmp, f"sm_{arch}.cubin")]
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            error = f"nvcc exited {done.returncode}: {' '.join(cmd)}\n{done.stdout}\n{done.stderr}"
            return [Result(base, "", arch, seconds=seconds, error=error, source="nvcc")]
        report = parse_ptxas(done.stdout + "\n" + done.stderr)
        if not report:
            return [Result(base, "", arch, seconds=seconds, error=f"no ptxas report\n{done.stderr}", source="nvcc")]
        names = _demangle(sorted(report), nvcc)
        return [
            Result(
                _short(names[mangled]), base, arch, f"{CUDA_THREADS} threads, --fmad=false", info.get("registers"),
                info.get("spill_stores"), info.get("spill_loads"), info.get("stack"), info.get("smem", 0),
                CUDA_THREADS, seconds, source="nvcc",
            )
            for mangled, info in sorted(report.items(), key=lambda kv: _short(names[kv[0]]))
        ]  # fmt: skip

    targets = list(targets)
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(len(targets) or 1) as pool:
        return [r for rs in pool.map(lambda a: build(a, tmp), targets) for r in rs]


# ---- table -------------------------------------------------------------------------------------------------------


def _status(results: list[Result]) -> str:
    problems = [p for r in results for p in r.problems]
    known = [p for r in results for p in r.known]
    text = "; ".join([f"FAIL {p}" for p in dict.fromkeys(problems)] + [f"known: {p}" for p in dict.fromkeys(known)])
    return (text or "ok").replace("|", "\\|").replace("\n", " ")


def _span(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return ""
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def table(results: list[Result]) -> str:
    """Markdown: one row per Triton specialisation and target; nvcc instantiations grouped per kernel and target."""
    head = "| kernel | variant | target | launch | registers | spills (st/ld bytes) | shared bytes | seconds | status |"
    lines = [head, "|" + "---|" * 9]
    triton = [r for r in results if r.source == "triton"]
    first = {}
    for i, r in enumerate(triton):
        first.setdefault(r.kernel, i)
    for r in sorted(triton, key=lambda r: first[r.kernel]):  # grouped by kernel, in launch order (stable)
        spills = "" if r.spill_stores is None else f"{r.spill_stores}/{r.spill_loads}"
        lines.append(
            f"| {r.kernel} | {r.variant} | sm_{r.target} | {r.launch} | {_cell(r.registers)} | {spills} "
            f"| {_cell(r.shared)} | {r.seconds:.2f} | {_status([r])} |"
        )
    groups: dict[tuple, list[Result]] = {}
    for r in (r for r in results if r.source == "nvcc"):
        groups.setdefault((r.kernel.split("<")[0], r.variant, r.target, r.launch), []).append(r)
    for (kernel, variant, target, launch), rs in groups.items():
        spills = f"{_span([r.spill_stores for r in rs])}/{_span([r.spill_loads for r in rs])}"
        what = f"{variant}: {len(rs)} instantiations" if not rs[0].error else variant
        lines.append(
            f"| {kernel} | {what} | sm_{target} | {launch} | {_span([r.registers for r in rs])} | {spills} "
            f"| {_span([r.shared for r in rs])} | {rs[0].seconds:.2f} | {_status(rs)} |"
        )
    return "\n".join(lines) + "\n"


def _cell(v) -> str:
    return "" if v is None else str(v)


def write_results(results: list[Result], out: str, header: str = "") -> None:
    """``out.md`` (header and :func:`table`) and ``out.jsonl`` (every result, one per line)."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".jsonl", "w") as f:
        for r in results:
            f.write(json.dumps(r.row()) + "\n")
    with open(out + ".md", "w") as f:
        f.write((header + "\n" if header else "") + table(results))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tempflow.compilecheck", description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default=",".join(map(str, TARGETS)), help="compute capabilities (default 80,90)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel Triton compilations")
    p.add_argument("--out", help="write OUT.md and OUT.jsonl (e.g. bench/results/compile_targets)")
    p.add_argument("--json", action="store_true", help="print a JSON summary (results, coverage, notes) on stdout")
    p.add_argument("--no-triton", action="store_true", help="skip the Triton kernels")
    p.add_argument("--no-nvcc", action="store_true", help="skip csrc/cuda")
    args = p.parse_args(argv)
    targets = [int(t) for t in args.targets.split(",") if t.strip()]
    unknown = sorted(set(targets) - set(SMEM_LIMIT))
    if unknown:
        p.error(f"no shared memory limit known for {unknown}; known: {sorted(SMEM_LIMIT)}")

    start = time.perf_counter()
    results: list[Result] = []
    coverage: list[str] = []
    notes = []
    if not args.no_triton:
        import triton

        t0 = time.perf_counter()
        specs = triton_specs()
        coverage = coverage_problems(specs)
        t1 = time.perf_counter()
        results += compile_all(specs, targets, args.jobs)
        notes.append(
            f"Triton {triton.__version__}: {len(specs)} specialisations recorded from tempflow.ops in {t1 - t0:.1f} s, "
            f"x {len(targets)} targets compiled to cubin in {time.perf_counter() - t1:.1f} s wall ({args.jobs} "
            "processes)"
        )
    if not args.no_nvcc:
        nvcc = find_nvcc()
        if nvcc is None:
            coverage.append("nvcc not found (set CUDA_HOME, or pass --no-nvcc)")
        else:
            t0 = time.perf_counter()
            results += nvcc_check(targets, nvcc)
            version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.splitlines()
            release = [line.strip() for line in version if "release" in line]
            notes.append(
                f"nvcc ({release[0] if release else '?'}): {os.path.relpath(CUDA_SOURCE, ROOT)} compiled with "
                f"-Xptxas -v in {time.perf_counter() - t0:.1f} s wall (targets in parallel)"
            )
    failures = coverage + [f"{r.kernel} [{r.variant}] sm_{r.target}: {x}" for r in results for x in r.problems]
    known = [f"{r.kernel} [{r.variant}] sm_{r.target}: {x}" for r in results for x in r.known]
    notes.append(f"total {time.perf_counter() - start:.1f} s")

    if args.json:
        print(json.dumps({"results": [r.row() for r in results], "coverage": coverage, "notes": notes}))
    if args.out:
        limits = ", ".join(f"sm_{t} {SMEM_LIMIT[t]} bytes" for t in targets)
        header = (
            "# Compile check for real targets\n\n"
            "`python -m tempflow.compilecheck --out bench/results/compile_targets` (CI: tests/test_compile_targets.py "
            "and tests/test_cuda_build.py). A row fails on a compile error, on spills, on shared memory over the "
            f"per-block limit ({limits}) or on a block needing more than {REGS_PER_SM} registers. Triton rows: one "
            "specialisation that tempflow.ops launches, compiled source to cubin (seconds: that compilation); nvcc "
            "rows: the template instantiations of one kernel (template arguments: state, velocity, branch dtypes; "
            "seconds: the whole file for that target).\n\n"
            + "\n".join(f"- {n}" for n in notes)
            + "".join(f"\n- known problem (tempflow.compilecheck.KNOWN_PROBLEMS): {k}" for k in known)
            + "".join(f"\n- FAIL {f}" for f in failures)
            + "\n"
        )
        write_results(results, args.out, header)
    for line in failures:
        print(f"FAIL {line}", file=sys.stderr)
    for line in known:
        print(f"known {line}", file=sys.stderr)
    print("; ".join(notes), file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    # tempflow does not import triton on import: this comes first, and the check compiles for real
    os.environ["TRITON_INTERPRET"] = "0"
    sys.exit(main())
