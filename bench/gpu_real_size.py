"""The real-size GPU check: the published SD3.5-Medium and FLUX.1-dev transformer configurations with random bf16
weights (nothing is downloaded), at 512 px and 1024 px. ``bash bench/gpu_check.sh`` runs it last on a lent GPU.

What it measures, in this order (each measurement validates its result; any wrong result makes the exit code 1):

1. step kernels at each model's latent size: the fused K-branch SDE step (noise drawn in the kernel), the K-action
   score and the K-action GRPO loss (forward + backward) against the eager Flow-GRPO step (bench/bench_step.py's
   eager variants), B in {4, 24} states, K = 6. GB/s against a measured device copy; x the eager step. Checked:
   fused samples = the torch reference's for the same noise, fused log-probs = the eager expression's for the same
   samples, fused loss and its velocity gradient = the official K-times-repeated autograd loss.
2. the forward cost of the transformer per batch size (what batching can gain on this card) and its TFLOP/s
   (FLOPs counted on the meta device by torch's FlopCounterMode) against a measured bf16 matmul.
3. a TempFlow rollout, T=10, K=6 branches at steps 0..8, N=4 seeds, one prompt (CFG 4.5 for SD3, FLUX.1-dev's
   guidance embedding 3.5): the batched engine (tempflow.rollout.rollout, max_batch 48 rows) against the naive
   official-structure loop (tempflow.rollout.naive_rollout), through the real adapter classes (SD3Model,
   FluxModel) fed precomputed random prompt embeddings; wall time, images per second, peak memory; the engine
   eager, under torch.compile and under torch.compile with CUDA graphs (mode reduce-overhead). Checked: the
   engine's rows equal the naive loop's (same index columns, old log-probs, states and actions to bf16 rounding).
4. one training step of S=6 (seed, step) states x K=6 actions (LoRA r=32 as the trainer prepares it, gradient
   checkpointing): one forward per state (the trainer's fused K-action loss) against one forward per action (the
   official structure, K forwards of the same S-row shape, gradients accumulated). Checked: equal loss and equal
   LoRA gradients.

The VAE and the reward are stand-ins (a fixed 1x1 projection of the latents to RGB and the mean pixel): both loops
decode and score the same paths, and neither is what the engine changes. Sizes that would not fit the time budget
(``--budget-s``, which gpu_check.sh sets from what is left of its ~8 minutes) are scaled down (fewer seeds) or
skipped, and the output says which; an estimate from the measured forward cost decides, before anything slow runs.

Results: one JSON object per line appended to <out>/gpu_real_size.jsonl (``--out``; default $OUT when set, else
bench/results): a header line (GPU, torch, CUDA, triton, diffusers, commit), then one line per measurement, check,
target and skip, then a summary line. Targets (issue 14 item 5, reported, not failing): fused kernels >= 80% of
the measured copy bandwidth (at sizes beyond the L2 cache) and >= 10x the eager step; the engine >= 2x the naive
loop at SD3.5-M size.

    python bench/gpu_real_size.py --device cuda          # on the GPU machine (gpu_check.sh does this)
    python bench/gpu_real_size.py --dry-run              # anywhere: configs on the meta device, params, FLOPs, plan
    python bench/gpu_real_size.py --smoke --device cpu   # every section end to end on tiny configs (tests)

The published configurations are written here (``SD35_MEDIUM``, ``FLUX1_DEV``): they cannot be downloaded on the
GPU machine; their parameter names are checked against diffusers' constructors by ``--dry-run``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from types import SimpleNamespace

import torch

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
for _path in (ROOT, BENCH):
    if _path not in sys.path:
        sys.path.insert(0, _path)

RESULTS_NAME = "gpu_real_size.jsonl"

# stabilityai/stable-diffusion-3.5-medium, transformer/config.json (SD3Transformer2DModel), as published: 24 MMDiT-X
# blocks of 24 heads x 64, dual attention (a second, image-only attention) in blocks 0..12, RMS q/k norm. Not
# downloadable on the GPU machine, so written here; these are the values the public code that rebuilds this model
# offline from diffusers uses, and they give the published ~2.5B parameters (2.24B weights + the 0.23B position
# embedding table that diffusers keeps as a buffer).
SD35_MEDIUM = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)),
    "qk_norm": "rms_norm",
}
# black-forest-labs/FLUX.1-dev, transformer/config.json (FluxTransformer2DModel): 19 double-stream and 38
# single-stream blocks of 24 heads x 128, the guidance embedding of the distilled model; ~12B parameters.
FLUX1_DEV = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
# Tiny configurations of the same classes for --smoke (every section on a CPU in seconds).
SD3_TINY = dict(SD35_MEDIUM, num_layers=2, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=16,
                dual_attention_layers=(0,))  # fmt: skip
FLUX_TINY = dict(FLUX1_DEV, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                 joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))  # fmt: skip


@dataclass(frozen=True)
class Spec:
    """One model: its diffusers class and config, the text conditioning its pipeline hands the transformer, and how
    it is guided (SD3: classifier-free guidance, a pair of rows per sample; FLUX.1-dev: its guidance embedding)."""

    name: str
    cls: str
    config: dict
    text_tokens: int  # SD3: 77 CLIP + 128 T5 tokens (Flow-GRPO's max_sequence_length); FLUX: 512 T5 tokens
    text_dim: int
    pooled_dim: int
    guidance: float
    params: tuple[float, float]  # the range the parameter count (weights + buffers) must fall in
    vae_channels: int = 16

    @property
    def cfg_pair(self) -> bool:
        return self.cls == "SD3Transformer2DModel"


SPECS = {
    "sd3.5-medium": Spec(
        "sd3.5-medium", "SD3Transformer2DModel", SD35_MEDIUM, 77 + 128, 4096, 2048, 4.5, (2.3e9, 2.7e9)
    ),  # fmt: skip
    "flux.1-dev": Spec("flux.1-dev", "FluxTransformer2DModel", FLUX1_DEV, 512, 4096, 768, 3.5, (11.5e9, 12.5e9)),
}
TINY_SPECS = {
    "sd3.5-medium": Spec("sd3-tiny", "SD3Transformer2DModel", SD3_TINY, 12, 32, 16, 4.5, (1e3, 1e8)),
    "flux.1-dev": Spec("flux-tiny", "FluxTransformer2DModel", FLUX_TINY, 8, 32, 16, 3.5, (1e3, 1e8)),
}

# tolerances: bf16 transformers give each forward's last bits by batch shape, so states drift apart a little over
# ten steps; a wrong row (another seed's, another branch's) is off by ~1.4 (relative), a wrong kernel by far more
TOL = {
    "bf16": {"state": 0.1, "logp": 1e-3, "reward": 0.05, "loss": 0.05, "grad": 0.1},
    "fp32": {"state": 1e-3, "logp": 1e-4, "reward": 1e-3, "loss": 1e-3, "grad": 1e-3},
}
CLIP_EPS = 1e-4  # the papers' SD3.5-M clip range (bench/bench_step.py)


# ---------------------------------------------------------------------------------------------------------------
# results: header, rows, checks, targets, skips


def git_commit() -> str:
    """TEMPFLOW_COMMIT, else ``git rev-parse HEAD`` (+dirty), else .git/HEAD read by hand, else 'unknown' (the GPU
    machine gets a copy of the working tree, usually without .git)."""
    if os.environ.get("TEMPFLOW_COMMIT"):
        return os.environ["TEMPFLOW_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                   capture_output=True, text=True, timeout=20).stdout.strip()  # fmt: skip
            return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        head = open(os.path.join(ROOT, ".git", "HEAD")).read().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[5:]
        path = os.path.join(ROOT, ".git", ref)
        if os.path.exists(path):
            return open(path).read().strip()
        for line in open(os.path.join(ROOT, ".git", "packed-refs")):
            if line.strip().endswith(" " + ref):
                return line.split()[0]
    except OSError:
        pass
    return "unknown"


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - a missing or broken package is reported as absent
        return None


def header(device: torch.device, mode: str, argv: list[str]) -> dict:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu = props.name
        extra = {"gpu_memory_GiB": round(props.total_memory / 2**30, 1), "sm_count": props.multi_processor_count,
                 "l2_MB": round(getattr(props, "L2_cache_size", 0) / 1e6, 1)}  # fmt: skip
    else:
        gpu = f"none ({device.type}: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        extra = {}
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "mode": mode, "gpu": gpu, "torch": torch.__version__,
            "cuda": torch.version.cuda, "triton": _version("triton"), "diffusers": _version("diffusers"),
            "peft": _version("peft"), "commit": git_commit(), "python": platform.python_version(),
            "argv": list(argv), **extra}  # fmt: skip


class Recorder:
    """Appends JSON lines to <out>/gpu_real_size.jsonl as they come (a killed run keeps what it measured) and keeps
    the failed checks, missed targets and skips for the summary and the exit code."""

    def __init__(self, out: str, head: dict):
        os.makedirs(out, exist_ok=True)
        self.path = os.path.join(out, RESULTS_NAME)
        self.rows: list[dict] = []
        self.failures: list[str] = []
        self.skips: list[str] = []
        self.targets: list[dict] = []
        self.fh = open(self.path, "a")
        self._write({"header": head})

    def _write(self, obj: dict) -> None:
        self.fh.write(json.dumps(obj, default=_jsonable) + "\n")
        self.fh.flush()

    def row(self, section: str, **fields) -> dict:
        r = {"section": section, **fields}
        self.rows.append(r)
        self._write(r)
        return r

    def check(self, section: str, what: str, ok: bool, **details) -> bool:
        ok = bool(ok)
        self._write({"section": section, "check": what, "ok": ok, **details})
        if not ok:
            self.failures.append(f"{section}: {what} {json.dumps(details, default=_jsonable)}")
            print(f"  CHECK FAILED  {section}: {what} {details}", flush=True)
        return ok

    def error(self, section: str, exc: BaseException) -> None:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self._write({"section": section, "error": repr(exc), "traceback": text[-4000:]})
        self.failures.append(f"{section}: raised {exc!r}")
        print(f"  ERROR  {section}: {exc!r}\n{text[-2000:]}", flush=True)

    def skip(self, section: str, reason: str) -> None:
        self._write({"section": section, "skipped": reason})
        self.skips.append(f"{section}: {reason}")
        print(f"  skipped  {section}: {reason}", flush=True)

    def target(self, what: str, value: float, goal: float, met: bool, **details) -> None:
        t = {"target": what, "value": value, "goal": goal, "met": bool(met), **details}
        self.targets.append(t)
        self._write(t)

    def close(self, summary: dict) -> None:
        self._write({"summary": summary})
        self.fh.close()


def _jsonable(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (torch.dtype, torch.device)):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    return repr(o)


class Budget:
    """Seconds left of ``--budget-s``, counted from the start of the script."""

    def __init__(self, seconds: float):
        self.seconds, self.start = float(seconds), time.perf_counter()

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def spent(self) -> float:
        return time.perf_counter() - self.start


class OutOfBudget(BaseException):
    """A section ran past the time budget and was stopped (reported as a skip, not as a wrong result). A
    BaseException, so that the ``except Exception`` of the code it interrupts does not swallow it."""


@contextlib.contextmanager
def deadline(seconds: float | None):
    """Raise :class:`OutOfBudget` in this (main) thread after ``seconds``; None: no limit."""
    if seconds is None or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise OutOfBudget(f"stopped after {seconds:.0f} s: the time budget ran out")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, max(float(seconds), 1.0))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def guarded(rec: Recorder, section: str, fn, budget: Budget, args):
    """``fn()`` with failures recorded (the run goes on) and a deadline at the end of the budget plus a grace."""
    limit = None if args.no_budget else max(budget.left(), 0.0) + args.grace_s
    try:
        with deadline(limit):
            return fn()
    except OutOfBudget as exc:
        rec.skip(section, str(exc))
    except Exception as exc:  # noqa: BLE001 - recorded as a failure; the other sections still run
        rec.error(section, exc)
    return None


# ---------------------------------------------------------------------------------------------------------------
# models: random bf16 weights on the device, or the meta device for the dry run


def transformer_class(spec: Spec):
    import diffusers

    return getattr(diffusers, spec.cls)


def check_config_names(spec: Spec) -> list[str]:
    """Config keys the installed diffusers' constructor does not take (empty when the names are right)."""
    import inspect

    params = inspect.signature(transformer_class(spec).__init__).parameters
    return [k for k in spec.config if k not in params]


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_transformer(spec: Spec, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """The transformer with random weights, built directly on ``device`` in ``dtype`` (the meta device allocates
    nothing: that is the dry run)."""
    cls = transformer_class(spec)
    torch.manual_seed(seed)
    with torch.device(device), default_dtype(dtype):
        model = cls(**spec.config)
    for module in model.modules():  # buffers made in fp32 (SD3's position table) follow, as with from_pretrained
        for name, buf in module.named_buffers(recurse=False):
            if buf.is_floating_point() and buf.dtype != dtype:
                module._buffers[name] = buf.to(dtype)
    return model.eval().requires_grad_(False)


def count(module) -> tuple[int, int]:
    return sum(p.numel() for p in module.parameters()), sum(b.numel() for b in module.buffers())


class PreviewDecoder(torch.nn.Module):
    """Stands in for the VAE: a fixed 1x1 projection of the latent channels to RGB at latent resolution, in fp32.
    Has what the adapters read of a diffusers VAE (``config.block_out_channels`` for the scale factor 8,
    ``scaling_factor``, ``shift_factor``, ``dtype``, ``decode(z).sample`` in [-1, 1])."""

    def __init__(self, channels: int, device):
        super().__init__()
        self.config = SimpleNamespace(block_out_channels=(128, 256, 512, 512), scaling_factor=1.0, shift_factor=0.0)
        g = torch.Generator().manual_seed(1)
        self.proj = torch.nn.Parameter((torch.randn(3, channels, generator=g) / channels**0.5).to(device),
                                       requires_grad=False)  # fmt: skip

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def decode(self, z: torch.Tensor):
        return SimpleNamespace(sample=torch.tanh(torch.einsum("bchw,rc->brhw", z.float(), self.proj)))


def mean_pixel(images, prompts, metadata=None):
    """The stand-in reward: each image's mean pixel."""
    return images.float().mean(dim=(1, 2, 3))


PROMPTS = ["a photo of prompt 0", "a photo of prompt 1", "a photo of prompt 2", "a photo of prompt 3"]


def embeddings(spec: Spec, prompts, device, dtype, seed: int = 0) -> dict:
    """Random prompt embeddings of the shapes the pipelines hand the transformer: ``{prompt: (hidden (L, D),
    pooled (P,))}``, the empty prompt "" being the unconditional one."""
    out = {}
    for i, p in enumerate(["", *prompts]):
        if torch.device(device).type == "meta":
            out[p] = (torch.empty(spec.text_tokens, spec.text_dim, device="meta", dtype=dtype),
                      torch.empty(spec.pooled_dim, device="meta", dtype=dtype))  # fmt: skip
            continue
        g = torch.Generator().manual_seed(1000 * seed + i)
        hidden = torch.randn(spec.text_tokens, spec.text_dim, generator=g)
        pooled = torch.randn(spec.pooled_dim, generator=g)
        out[p] = (hidden.to(device, dtype), pooled.to(device, dtype))
    return out


def adapter(spec: Spec, transformer, res: int, device, prompts=PROMPTS):
    """The real tempflow adapter around ``transformer`` at ``res`` px, prompts precomputed, the stand-in decoder."""
    from tempflow.models.diffusers_models import FluxModel, SD3Model

    dtype = next(transformer.parameters()).dtype
    kwargs = dict(vae=PreviewDecoder(spec.vae_channels, device), embeddings=embeddings(spec, prompts, device, dtype),
                  height=res, width=res, guidance=spec.guidance, device=device,
                  max_sequence_length=spec.text_tokens)  # fmt: skip
    return SD3Model(transformer, **kwargs) if spec.cfg_pair else FluxModel(transformer, **kwargs)


def tokens(spec: Spec, model) -> int:
    """Image tokens of one row."""
    if spec.cfg_pair:
        c, h, w = model.latent_shape
        p = spec.config["patch_size"]
        return (h // p) * (w // p)
    return model.latent_shape[0]


def flops_per_row(spec: Spec, res: int) -> float:
    """FLOPs of one transformer row (one sample, one half of a CFG pair) at ``res`` px, counted on the meta device
    by torch.utils.flop_counter (matmuls and attention; the elementwise rest is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    meta = torch.device("meta")
    t = build_transformer(spec, meta, torch.bfloat16)
    model = adapter(spec, t, res, meta, prompts=PROMPTS[:1])
    cond = model.encode(PROMPTS[:1])
    x = torch.empty(1, *model.latent_shape, device=meta)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():  # one sample through the adapter as the loops call it, then per row
        model.velocity(x, 0.5, cond, torch.zeros(1, dtype=torch.long), spec.guidance)
    return float(counter.get_total_flops()) / model.forward_rows(spec.guidance)


# ---------------------------------------------------------------------------------------------------------------
# timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall(fn, device):
    """``(result, seconds)`` of one call, the device synchronised on both sides."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def device_time(fn, device: torch.device, reps: int = 20, rounds: int = 3, warmup: int = 2) -> float:
    """Seconds per call: the median over ``rounds`` of ``reps`` back-to-back calls timed with CUDA events (launch
    and host overheads included, as a caller sees them); host clock on a CPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(rounds):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / reps)
        else:
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            times.append((time.perf_counter() - t0) / reps)
    return statistics.median(times)


def graph_time(fn, device: torch.device, reps: int = 20) -> float:
    """Seconds per replay of ``fn`` captured in a CUDA graph: the kernels' own time, without launch gaps."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return device_time(graph.replay, device, reps=reps, warmup=1)


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes/s of a device-to-device copy, bytes read plus bytes written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    t = device_time(lambda: dst.copy_(src), device, reps=10)
    return 2 * nbytes / t


def matmul_rate(device: torch.device, n: int) -> float:
    """FLOP/s of an n x n x n bf16 matrix product on random data."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    t = device_time(lambda: a @ b, device, reps=10)
    return 2 * n**3 / t


@contextlib.contextmanager
def peak_memory(device: torch.device, out: dict):
    """``out["peak_GiB"]``: the most memory allocated inside the block, ``out["extra_GiB"]`` above what was
    allocated on entry (the weights and inputs); nothing on a CPU."""
    if device.type != "cuda":
        yield
        return
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    try:
        yield
    finally:
        sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        out.update(peak_GiB=peak / 2**30, extra_GiB=(peak - before) / 2**30)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (NaN when either holds a non-finite value)."""
    a, b = a.double(), b.double()
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        return float("nan")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def within(value: float, limit: float) -> bool:
    return math.isfinite(value) and value <= limit


# ---------------------------------------------------------------------------------------------------------------
# 1. step kernels


def kernel_sizes(specs: dict, resolutions) -> list[tuple[str, tuple[int, ...]]]:
    """Latent shapes (per sample) of each model at each resolution: SD3 (16, H/8, W/8), FLUX packed (H/16 W/16, 64)."""
    sizes = []
    for spec in specs.values():
        for res in resolutions:
            if spec.cfg_pair:
                shape = (spec.config["in_channels"], res // 8, res // 8)
            else:
                shape = ((res // 16) * (res // 16), spec.config["in_channels"])
            sizes.append((f"{spec.name} {res}px", shape))
    return sizes


def section_kernels(rec: Recorder, device: torch.device, sizes, batches, K: int, reps: int, copy_Bps: float,
                    l2_bytes: int) -> None:  # fmt: skip
    for label, shape in sizes:
        for B in batches:
            section = f"kernels {label} B={B} K={K}"
            try:
                kernel_case(rec, section, device, label, shape, B, K, reps, copy_Bps, l2_bytes)
            except Exception as exc:  # noqa: BLE001 - recorded as a failure; the other sizes still run
                rec.error(section, exc)
            free(device)


def kernel_case(rec: Recorder, section: str, device: torch.device, label: str, shape, B: int, K: int, reps: int,
                copy_Bps: float, l2_bytes: int) -> None:  # fmt: skip
    """One latent size and batch: the checks, then sample / score / loss timed fused against eager."""
    import bench_step

    from tempflow import ops, rng, sde
    from tempflow.compat.flow_grpo_eager import EagerScheduler

    backend = ops.resolve_backend(device)
    grid = sde.time_grid(10, shift=3.0, device=device)
    table = sde.sde_table(grid, "flow-grpo", 0.7)
    sched = EagerScheduler(grid)
    tol = TOL["fp32"]
    g = torch.Generator(device).manual_seed(B)
    x = torch.randn(B, *shape, device=device, generator=g)
    v = torch.randn(B, *shape, device=device, generator=g).to(torch.bfloat16)
    v_ref = (v.float() + 0.05 * torch.randn(v.shape, device=device, generator=g)).to(torch.bfloat16)
    steps = torch.arange(B, device=device) % 9
    ts = grid.timesteps[steps]
    ids = torch.stack(torch.meshgrid(torch.arange(B), torch.arange(K), indexing="ij"), -1).to(device)
    keys = rng.stream_keys(0, ids)
    noise = torch.randn(B, K, *shape, device=device, generator=g)
    d = x[0].numel()
    n = B * d

    # --- checks: the fused ops against the torch reference and the eager (official) expressions
    fused = ops.branch_step(x, v, steps, table, K, noise=noise, backend=backend)
    ref = ops.branch_step(x, v, steps, table, K, noise=noise, backend="torch")
    err = rel(fused.samples, ref.samples)
    rec.check(section, "fused samples = reference samples (same noise)", within(err, tol["state"]), rel_err=err)
    err = float((fused.log_prob - ref.log_prob).abs().max())
    rec.check(section, "fused log-probs = reference log-probs (same noise)", within(err, tol["logp"]), max_abs_err=err)
    keyed = ops.branch_step(x, v, steps, table, K, keys=keys, backend=backend)
    keyed_ref = ops.branch_step(x, v, steps, table, K, keys=keys, backend="torch")
    err = rel(keyed.samples, keyed_ref.samples)
    rec.check(section, "fused in-kernel noise = the reference stream", within(err, tol["state"]), rel_err=err)
    del fused, ref, keyed_ref, noise
    eager_samples, eager_logp = bench_step.eager_sample(sched, x, v, ts, K, torch.Generator(device).manual_seed(1))
    scored = ops.branch_score(x, v, steps, table, eager_samples.view(B, K, *shape), backend=backend)
    err = float((scored.flatten() - eager_logp.flatten()).abs().max())
    rec.check(section, "fused log-probs of the eager samples = the eager log-probs", within(err, tol["logp"]),
              max_abs_err=err)  # fmt: skip
    del eager_samples, eager_logp, scored
    acts = keyed.samples
    old = keyed.log_prob.detach()  # ratio 1: no entry near the clip boundary, so rounding cannot flip a clip
    adv = torch.randn(B, K, device=device, generator=g)
    w = torch.rand(B, device=device, generator=g) + 0.5
    leaf_e = v.detach().clone().requires_grad_(True)
    leaf_f = v.detach().clone().requires_grad_(True)
    loss_e = bench_step.eager_loss(sched, x, leaf_e, ts, acts, old, adv, w, v_ref, table, steps)
    loss_f = bench_step.fused_loss(backend, x, leaf_f, steps, table, acts, old, adv, w, v_ref)
    loss_e, loss_f = float(loss_e.detach()), float(loss_f.detach())
    err = abs(loss_f - loss_e) / max(abs(loss_e), 1e-12)
    rec.check(section, "fused loss = the official K-times-repeated loss", within(err, 1e-3), rel_err=err)
    err = rel(leaf_f.grad, leaf_e.grad)
    rec.check(section, "fused velocity gradient = autograd's of the official loss", within(err, 3e-2), rel_err=err)
    del leaf_e, leaf_f

    # --- timings (bytes as bench/bench_step.py counts them: each input read once, each output written once)
    def leaf():
        return v.detach().clone().requires_grad_(True)

    modes = {
        "sample": (
            lambda: bench_step.eager_sample(sched, x, v, ts, K, torch.Generator(device).manual_seed(1)),
            lambda: ops.branch_step(x, v, steps, table, K, keys=keys, backend=backend),
            n * (4 + 2) + B * K * d * 4,  # read x (fp32) and v (bf16), write K samples (fp32)
        ),
        "score": (
            lambda: bench_step.eager_score(sched, x, v, ts, acts),
            lambda: ops.branch_score(x, v, steps, table, acts, backend=backend),
            n * (4 + 2) + B * K * d * 4,  # read x, v and the K samples
        ),
        "loss fwd+bwd": (
            lambda: bench_step.eager_loss(sched, x, leaf(), ts, acts, old, adv, w, v_ref, table, steps),
            lambda: bench_step.fused_loss(backend, x, leaf(), steps, table, acts, old, adv, w, v_ref),
            2 * (n * (4 + 2 + 2) + B * K * d * 4) + n * 2,  # x, v, v_ref, K actions twice; the bf16 gradient
        ),
    }
    for mode, (eager_fn, fused_fn, moved) in modes.items():
        eager_s = device_time(eager_fn, device, reps=max(2, reps // 4), rounds=2)
        fused_s = device_time(fused_fn, device, reps=reps)
        graph_s, why = None, None
        if device.type == "cuda":
            try:
                graph_s = graph_time(fused_fn, device, reps=reps)
            except Exception as exc:  # noqa: BLE001 - a capture that fails is reported, not fatal
                why = repr(exc)[:300]
                torch.ones(1, device=device).add_(1)  # the stream must have left capture: else this raises
                sync(device)
        kernel_s = graph_s or fused_s
        r = rec.row("kernels", size=label, shape=shape, B=B, K=K, mode=mode, backend=backend, eager_ms=1e3 * eager_s,
                    fused_ms=1e3 * fused_s, fused_graph_ms=None if graph_s is None else 1e3 * graph_s,
                    graph_error=why, bytes=moved, eager_GBps=moved / eager_s / 1e9, fused_GBps=moved / kernel_s / 1e9,
                    frac_copy_bw=moved / kernel_s / copy_Bps, speedup_vs_eager=eager_s / fused_s,
                    beyond_l2=moved > 4 * l2_bytes)  # fmt: skip
        graph_ms = float("nan") if graph_s is None else 1e3 * graph_s
        print(f"  {label:>22} B={B:<3} {mode:<13} eager {1e3 * eager_s:8.3f} ms  fused {1e3 * fused_s:7.3f} ms "
              f"(graph {graph_ms:7.3f})  {r['fused_GBps']:7.1f} GB/s = {r['frac_copy_bw']:.2f} of copy  "
              f"x{r['speedup_vs_eager']:.1f} eager", flush=True)  # fmt: skip
        if r["beyond_l2"] and device.type == "cuda":
            rec.target(f"{label} B={B} {mode}: fused >= 80% of copy bandwidth", r["frac_copy_bw"], 0.8,
                       r["frac_copy_bw"] >= 0.8)  # fmt: skip
            rec.target(f"{label} B={B} {mode}: fused >= 10x the eager step", r["speedup_vs_eager"], 10,
                       r["speedup_vs_eager"] >= 10)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# 2. forward cost


def forward_table(rec: Recorder, spec: Spec, model, res: int, device, samples_list, flops_row: float,
                  matmul_Fps: float | None) -> dict[int, float]:  # fmt: skip
    """Seconds of one guided velocity (what the engine and the naive loop call) per number of samples."""
    cond = model.encode(PROMPTS[:1])
    rows_per = model.forward_rows(spec.guidance)
    out = {}
    for b in samples_list:
        x = torch.randn(b, *model.latent_shape, device=device)
        index = torch.zeros(b, dtype=torch.long)
        t = torch.full((b,), 0.5)

        def call(x=x, index=index, t=t):
            with torch.no_grad():
                return model.velocity(x, t, cond, index, spec.guidance)

        v, _ = wall(call, device)  # warm-up (and first-use kernel selection)
        ok = bool(torch.isfinite(v).all())
        rec.check(f"forward {spec.name} {res}px", f"finite velocity at {b} samples", ok)
        secs = min(wall(call, device)[1] for _ in range(2))
        out[b] = secs
        rows = b * rows_per
        rate = rows * flops_row / secs
        rec.row("forward", model=spec.name, res=res, samples=b, rows=rows, tokens_per_row=tokens(spec, model),
                seconds=secs, ms_per_row=1e3 * secs / rows, TFLOPs=rate / 1e12,
                frac_matmul=rate / matmul_Fps if matmul_Fps else None)  # fmt: skip
        print(
            f"  forward {spec.name} {res}px: {b:3d} samples ({rows:3d} rows) {1e3 * secs:9.1f} ms  "
            f"{1e3 * secs / rows:7.2f} ms/row  {rate / 1e12:6.1f} TFLOP/s",
            flush=True,
        )
        del x, v
    return out


def per_call(table: dict[int, float], b: int) -> float:
    """Seconds of one velocity of ``b`` samples, interpolated linearly in the measured table (extrapolated at the
    largest batch's per-sample cost)."""
    pts = sorted(table.items())
    if b <= pts[0][0]:
        return pts[0][1]
    for (b0, t0), (b1, t1) in zip(pts, pts[1:], strict=False):
        if b <= b1:
            return t0 + (t1 - t0) * (b - b0) / (b1 - b0)
    bl, tl = pts[-1]
    return tl * b / bl


def rollout_estimate(table, plan, N: int, P: int, chunk: int) -> dict:
    """Seconds of the engine and the naive loop from the forward table (the model is the cost at these sizes)."""
    samples = P * N * plan.model_calls_per_seed()
    engine = (samples // chunk) * per_call(table, chunk) + (per_call(table, samples % chunk) if samples % chunk else 0)
    last = max(plan.sde_steps)
    naive = P * N * ((last + 1) * per_call(table, 1)
                     + sum(plan.num_steps - 1 - k for k in plan.sde_steps) * per_call(table, plan.K))  # fmt: skip
    return {"engine": 1.15 * engine, "naive": 1.1 * naive}


# ---------------------------------------------------------------------------------------------------------------
# 3. rollouts


class RowCounter:
    """Counts the transformer rows (a CFG pair counts two) and forwards of the adapter."""

    def __init__(self, model):
        self.rows = self.calls = 0
        inner = model.forward_velocity

        def forward_velocity(x, t, cond, *args, **kwargs):
            self.rows += x.shape[0]
            self.calls += 1
            return inner(x, t, cond, *args, **kwargs)

        model.forward_velocity = forward_velocity

    def reset(self):
        self.rows = self.calls = 0


def compare_batches(a, b, tol: dict) -> dict:
    """Errors between two rollouts' rows (the same rows, in the same canonical order)."""
    same_index = len(a) == len(b) and all(
        torch.equal(getattr(a, k).cpu(), getattr(b, k).cpu()) for k in ("prompt_index", "seed_index", "step", "branch")
    )
    if not same_index:
        return {"same_index_columns": False, "rows": [len(a), len(b)]}
    logp = float((a.old_log_prob.double().cpu() - b.old_log_prob.double().cpu()).abs().max())

    def worst(u, w):  # per row, the worst one; NaN if any row holds a non-finite value
        errs = [rel(u[i], w[i]) for i in range(u.shape[0])]
        return float("nan") if any(math.isnan(e) for e in errs) else max(errs, default=0.0)

    return {"same_index_columns": True, "rows": len(a), "logp_max_abs": logp, "state_rel": worst(a.state, b.state),
            "action_rel": worst(a.action, b.action),
            "reward_max_abs": float((a.reward.double().cpu() - b.reward.double().cpu()).abs().max())}  # fmt: skip


def rollout_ok(err: dict, tol: dict) -> bool:
    return (err["same_index_columns"] and within(err["logp_max_abs"], tol["logp"])
            and within(err["state_rel"], tol["state"]) and within(err["action_rel"], tol["state"])
            and within(err["reward_max_abs"], tol["reward"]))  # fmt: skip


BLOCKS = ("JointTransformerBlock", "FluxTransformerBlock", "FluxSingleTransformerBlock")


@contextlib.contextmanager
def compiled(model, mode: str | None, scope: str = "blocks"):
    """The adapter's transformer under torch.compile (``mode`` None: eager), dynamic in the batch size. ``scope``
    "blocks": each transformer block compiled in place (regional compilation: identical blocks share one compiled
    code, so compiling takes seconds, not minutes); "model": the whole transformer as one graph."""
    if mode is None:
        yield
        return
    # "dynamo-eager": traced by dynamo, run by eager torch (no inductor): what --smoke checks on a CPU
    kwargs = {"backend": "eager"} if mode == "dynamo-eager" else ({} if mode == "default" else {"mode": mode})
    original = model.transformer
    blocks = [m for m in original.modules() if type(m).__name__ in BLOCKS] if scope == "blocks" else []
    if scope == "blocks" and not blocks:
        raise RuntimeError(f"no transformer blocks ({', '.join(BLOCKS)}) found in {type(original).__name__}")
    if blocks:
        for block in blocks:
            block.compile(dynamic=True, **kwargs)
    else:
        model.transformer = torch.compile(original, dynamic=True, **kwargs)
    own = vars(model).get("forward_velocity")  # the instance's wrapper (RowCounter), if any
    if mode == "reduce-overhead":  # CUDA graphs: each forward starts a new step of the graph trees
        inner = model.forward_velocity

        def forward_velocity(*a, **k):
            torch.compiler.cudagraph_mark_step_begin()
            return inner(*a, **k)

        model.forward_velocity = forward_velocity
    try:
        yield
    finally:
        if own is not None:
            model.forward_velocity = own
        else:
            vars(model).pop("forward_velocity", None)
        model.transformer = original
        for block in blocks:
            block._compiled_call_impl = None  # what nn.Module.compile set: back to the eager forward
        torch._dynamo.reset()


def run_rollout(rec, section, fn, model, spec, counter, prompts, rcfg, device, extra: dict):
    counter.reset()
    stats: dict = {}
    mem: dict = {}
    with peak_memory(device, mem):
        batch, secs = wall(lambda: fn(model, prompts, mean_pixel, rcfg, stats=stats), device)
    images = batch.images.shape[0]
    r = rec.row("rollout", **extra, seconds=secs, images=images, images_per_s=images / secs, rows=len(batch),
                transformer_rows=counter.rows, forwards=counter.calls, largest_batch=stats.get("largest_batch"),
                peak_live_items=stats.get("peak_live_items"), **mem)  # fmt: skip
    print(
        f"  {section}: {extra['variant']:<22} {secs:7.2f} s  {images / secs:7.2f} images/s  {counter.calls:5d} "
        f"forwards  {counter.rows:6d} rows  peak {mem.get('peak_GiB', float('nan')):.1f} GiB",
        flush=True,
    )
    return batch, r


def section_rollout(rec: Recorder, spec: Spec, model, res: int, device, args, table, budget: Budget, reserve: float,
                    modes=(None,), naive: bool = True) -> dict:  # fmt: skip
    """The engine against the naive loop at ``res`` px; N scaled down (4, 2, 1) to fit the budget left over
    ``reserve`` seconds. Returns ``{variant: row}``."""
    from tempflow.rollout import BranchPlan, RolloutConfig, naive_rollout, rollout

    section = f"rollout {spec.name} {res}px"
    plan = BranchPlan.tempflow(args.steps, args.branches)
    P = args.prompts
    chunk = model.samples_per_forward(args.max_batch, spec.guidance)
    compile_s = 0.0 if all(m is None for m in modes) else args.compile_allowance_s
    chosen, est = None, None
    for N in [n for n in (args.seeds, 2, 1) if n <= args.seeds]:
        e = rollout_estimate(table, plan, N, P, chunk)
        need = (
            e["engine"] * sum(2 if m else 1 for m in modes)
            + (e["naive"] if naive else 0)
            + compile_s * sum(1 for m in modes if m)
        )
        if need <= budget.left() - reserve or args.no_budget:
            chosen, est = N, e
            break
    if chosen is None:
        e = rollout_estimate(table, plan, 1, P, chunk)
        rec.skip(section, f"estimated {e['engine'] + e['naive']:.0f} s at N=1 > {budget.left() - reserve:.0f} s "
                          "left of the budget")  # fmt: skip
        return {}
    if chosen != args.seeds:
        rec.skip(section + f" N={args.seeds}", f"scaled down to N={chosen}: N={args.seeds} was estimated over the "
                                               f"{budget.left() - reserve:.0f} s left of the budget")  # fmt: skip
    rcfg = RolloutConfig(plan=plan, seeds_per_prompt=chosen, guidance=spec.guidance, max_batch=args.max_batch,
                         seed=0)  # fmt: skip
    prompts = PROMPTS[:P]
    counter = RowCounter(model)
    base = dict(
        model=spec.name,
        res=res,
        N=chosen,
        K=plan.K,
        T=plan.num_steps,
        prompts=P,
        max_batch=args.max_batch,
        guidance=spec.guidance,
        cfg_pair=spec.cfg_pair,
        est_engine_s=est["engine"],
        est_naive_s=est["naive"],
    )
    tol = TOL["fp32" if model.dtype == torch.float32 else "bf16"]
    rows, batches = {}, {}
    if naive:
        batches["naive"], rows["naive"] = run_rollout(rec, section, naive_rollout, model, spec, counter, prompts, rcfg,
                                                      device, dict(base, variant="naive (official)"))  # fmt: skip
    for mode in modes:
        name = "engine" if mode is None else f"engine compiled {mode}"
        with compiled(model, mode, args.compile_scope):
            if mode is not None:  # compile (and record graphs) in an untimed first run
                _, warm = wall(lambda: rollout(model, prompts, mean_pixel, rcfg), device)
                rec.row("compile", model=spec.name, res=res, mode=mode, first_rollout_s=warm)
                print(f"  {section}: compile + first rollout ({mode}) {warm:.1f} s", flush=True)
            batches[name], rows[name] = run_rollout(rec, section, rollout, model, spec, counter, prompts, rcfg,
                                                    device, dict(base, variant=name))  # fmt: skip
    reference = "naive" if naive else "engine"
    for name, batch in batches.items():
        if name == reference:
            continue
        err = compare_batches(batch, batches[reference], tol)
        rec.check(section, f"{name} rows = {reference} rows", rollout_ok(err, tol), **err)
        ratio = rows[reference]["seconds"] / rows[name]["seconds"]
        rows[name][f"speedup_vs_{reference}"] = ratio
        rec.row("rollout speedup", model=spec.name, res=res, variant=name, N=chosen, reference=reference,
                speedup=ratio)  # fmt: skip
    for name, batch in batches.items():
        rec.check(section, f"{name}: finite rows", bool(torch.isfinite(batch.action).all()
                                                        and torch.isfinite(batch.old_log_prob).all()))  # fmt: skip
    return rows


# ---------------------------------------------------------------------------------------------------------------
# 4. one training step


def section_train(rec: Recorder, spec: Spec, model, res: int, device, args, reps: int) -> None:
    """One optimizer step's forward and backward over S states x K actions: one forward per state (the trainer)
    against one forward per action (the official structure), the same S-row forward shape in both."""
    from tempflow import ops, sde
    from tempflow.rollout.keys import noise_keys
    from tempflow.train.trainer import TrainConfig, prepare

    section = f"train {spec.name} {res}px"
    S, K, T = args.states, args.branches, args.steps
    lora = not args.no_lora
    if lora:
        try:
            import peft  # noqa: F401
        except ImportError:
            lora = False
            rec.skip(section + " lora", "peft is not installed: full gradients in the weights' dtype instead")
    if not lora and spec.name.startswith("flux") and not args.smoke:
        rec.skip(section, "full fine-tuning gradients of FLUX.1-dev need LoRA here (install peft)")
        return
    grid = model.time_grid(T, device=device)
    table = sde.sde_table(grid, "flow-grpo", 0.7)
    weights = sde.noise_aware_weights(table, range(T - 1))
    steps = torch.arange(S) % (T - 1)
    g = torch.Generator(device).manual_seed(7)
    x = torch.randn(S, *model.latent_shape, device=device, generator=g)
    cond = model.encode(PROMPTS[:1])
    index = torch.zeros(S, dtype=torch.long)
    t = table.t[steps.to(table.t.device)]
    with torch.no_grad():
        v0 = model.velocity(x, t, cond, index, spec.guidance).float()
    keys = noise_keys(0, torch.zeros(S, dtype=torch.long), torch.arange(S), steps, K)
    acts = ops.branch_step(x, v0, steps, table, K, keys=keys)
    old = acts.log_prob
    adv = torch.randn(S, K, device=device, generator=g).clamp(-5, 5)
    w = weights[steps.to(weights.device)].to(device)
    if lora:
        prepare(model, TrainConfig(dtype="bf16" if model.dtype == torch.bfloat16 else "fp32", lora_rank=args.lora_rank,
                                   lora_alpha=2 * args.lora_rank, grad_checkpointing=not args.no_grad_checkpointing,
                                   zero_stage=0, beta=0.0))  # fmt: skip
    else:
        model.transformer.requires_grad_(True)
        if not args.no_grad_checkpointing:
            model.transformer.enable_gradient_checkpointing()
    model.transformer.train()
    params = [p for p in model.trainable_parameters()]

    def zero():
        for p in params:
            p.grad = None

    def per_state():
        v = model.velocity(x, t, cond, index, spec.guidance).float()
        loss = ops.branch_grpo_loss(v, x, acts.samples, steps, table, old, adv, w, CLIP_EPS)
        loss.backward()
        return loss.detach()

    def per_action():
        total = 0.0
        for j in range(K):
            v = model.velocity(x, t, cond, index, spec.guidance).float()
            loss = ops.branch_grpo_loss(v, x, acts.samples[:, j : j + 1], steps, table, old[:, j : j + 1],
                                        adv[:, j : j + 1], w, CLIP_EPS) / K  # fmt: skip
            loss.backward()
            total = total + loss.detach()
        return total

    def grads():
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().flatten()
                          for p in params])  # fmt: skip

    zero()
    wall(per_state, device)  # warm-up: kernels for this shape (the per-action forwards have the same shape)
    times = {"per state": [], "per action": []}
    results = {}
    for name, fn, n in (("per state", per_state, reps), ("per action", per_action, max(1, reps // 2))):
        mem: dict = {}
        for _ in range(n):
            zero()
            with peak_memory(device, mem):
                loss, secs = wall(fn, device)
            times[name].append(secs)
        results[name] = (float(loss), grads(), mem)
        zero()
    tol = TOL["fp32" if model.dtype == torch.float32 else "bf16"]
    (l_s, g_s, _), (l_a, g_a, _) = results["per state"], results["per action"]
    lerr = abs(l_s - l_a) / max(float((adv * w[:, None]).abs().mean()), 1e-12)
    gerr = rel(g_s, g_a)
    rec.check(section, "loss per state = loss per action", within(lerr, tol["loss"]), rel_err=lerr,
              loss_per_state=l_s, loss_per_action=l_a)  # fmt: skip
    rec.check(section, "gradients per state = per action", within(gerr, tol["grad"]) and float(g_a.norm()) > 0,
              rel_err=gerr, grad_norm=float(g_a.norm()), trainable=int(g_a.numel()))  # fmt: skip
    rows_per = model.forward_rows(spec.guidance)
    for name in times:
        secs = statistics.median(times[name])
        mem = results[name][2]
        rec.row("train", model=spec.name, res=res, variant=f"one forward {name}", S=S, K=K,
                forwards=1 if name == "per state" else K, rows_per_forward=S * rows_per, seconds=secs, lora=lora,
                lora_rank=args.lora_rank if lora else None, grad_checkpointing=not args.no_grad_checkpointing,
                speedup_vs_per_action=statistics.median(times["per action"]) / secs, **mem)  # fmt: skip
        print(
            f"  {section}: one forward {name:<10} {secs:7.3f} s  peak {mem.get('peak_GiB', float('nan')):.1f} GiB",
            flush=True,
        )


# ---------------------------------------------------------------------------------------------------------------
# the whole check


def dry_run(rec: Recorder, args) -> None:
    """Configs on the meta device: constructor names, parameter counts, latent shapes, FLOPs per row, the plan."""
    from tempflow.rollout import BranchPlan

    specs = TINY_SPECS if args.smoke else SPECS
    plan = BranchPlan.tempflow(args.steps, args.branches)
    for key in args.models:
        spec = specs[key]
        bad = check_config_names(spec)
        rec.check("config", f"{spec.name}: every config key is a {spec.cls} argument", not bad, unknown=bad)
        t = build_transformer(spec, torch.device("meta"), torch.bfloat16)
        params, buffers = count(t)
        total = params + buffers
        lo, hi = spec.params
        rec.row("config", model=spec.name, cls=spec.cls, config=spec.config, params=params, buffers=buffers,
                total=total, bf16_GiB=2 * total / 2**30)  # fmt: skip
        rec.check("config", f"{spec.name}: {total / 1e9:.2f}B parameters in [{lo / 1e9:g}B, {hi / 1e9:g}B]",
                  lo <= total <= hi, params=params, buffers=buffers)  # fmt: skip
        print(f"  {spec.name}: {params / 1e9:.3f}B weights + {buffers / 1e9:.3f}B buffers ({spec.cls})", flush=True)
        for res in args.resolutions:
            model = adapter(spec, t, res, torch.device("meta"))
            flops = flops_per_row(spec, res)
            rows_per = model.forward_rows(spec.guidance)
            samples = args.prompts * args.seeds * plan.model_calls_per_seed()
            rec.row("plan", model=spec.name, res=res, latent_shape=model.latent_shape, image_tokens=tokens(spec, model),
                    text_tokens=spec.text_tokens, TFLOP_per_row=flops / 1e12, rows_per_sample=rows_per,
                    rollout_rows=samples * rows_per, rollout_PFLOP=samples * rows_per * flops / 1e15,
                    train_step_rows=args.states * rows_per)  # fmt: skip
            print(
                f"    {res}px: latents {tuple(model.latent_shape)}, {tokens(spec, model)} image + {spec.text_tokens} "
                f"text tokens, {flops / 1e12:.3f} TFLOP per row; a rollout (N={args.seeds}, K={plan.K}, "
                f"T={plan.num_steps}) forwards {samples * rows_per} rows = {samples * rows_per * flops / 1e15:.1f}"
                " PFLOP",
                flush=True,
            )


def real_run(rec: Recorder, args, device: torch.device, budget: Budget) -> None:
    specs = TINY_SPECS if args.smoke else SPECS
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    l2 = 0
    if device.type == "cuda":
        l2 = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0))
    copy_Bps = copy_bandwidth(device, (4 << 20) if args.smoke else (1 << 30))
    matmul_Fps = matmul_rate(device, 256 if args.smoke else 8192)
    rec.row("ceilings", copy_GBps=copy_Bps / 1e9, matmul_TFLOPs=matmul_Fps / 1e12, l2_bytes=l2)
    print(
        f"  copy {copy_Bps / 1e9:.0f} GB/s (read + write), bf16 matmul {matmul_Fps / 1e12:.0f} TFLOP/s, "
        f"L2 {l2 / 1e6:.0f} MB",
        flush=True,
    )

    if "kernels" in args.sections:
        print("== step kernels", flush=True)
        sizes = kernel_sizes({k: specs[k] for k in args.models}, args.resolutions)
        guarded(rec, "kernels", lambda: section_kernels(rec, device, sizes, args.kernel_batches, args.branches,
                                                        args.reps, copy_Bps, l2), budget, args)  # fmt: skip

    def run_extra(kind, key, res, table, mode, reserve):
        """A compiled engine against the eager one, or a rollout at another resolution, on a fresh transformer."""
        spec = specs[key]
        section = f"{kind} {spec.name} {res}px" + (f" ({mode})" if mode else "")
        if budget.left() - reserve < args.extra_min_s and not args.no_budget:
            rec.skip(section, f"{budget.left():.0f} s left of the budget")
            return
        print(f"== {section}", flush=True)

        def extra():
            model = adapter(spec, build_transformer(spec, device, dtype), res, device)
            if kind == "compile":  # the eager engine again, as the reference of the same session
                rows = section_rollout(rec, spec, model, res, device, args, table, budget, reserve,
                                       modes=(None, mode), naive=False)  # fmt: skip
                if rows:
                    name = f"engine compiled {mode}"
                    print(f"  {section}: x{rows[name]['speedup_vs_engine']:.2f} the eager engine", flush=True)
            else:
                section_rollout(rec, spec, model, res, device, args, table, budget, reserve)

        guarded(rec, section, extra, budget, args)
        free(device)

    # Per model: the forward cost at each resolution, the rollout at the first resolution, then the training step
    # (LoRA changes the transformer, so it comes last), then the first compile mode (SD3). The other extras
    # (further compile modes, rollouts at the other resolutions) come after every model's main sections, as far as
    # the budget goes.
    extras = []
    for i, key in enumerate(args.models):
        spec = specs[key]
        reserve = args.reserve_s * (len(args.models) - 1 - i)  # kept for the models still to come
        print(f"== {spec.name}: {spec.cls} with random {args.dtype} weights on {device}", flush=True)
        built = guarded(rec, f"build {spec.name}", lambda spec=spec: wall(lambda: build_transformer(spec, device,
                                                                                                      dtype), device),
                        budget, args)  # fmt: skip
        if built is None:
            free(device)
            continue
        transformer, secs = built
        params, buffers = count(transformer)
        rec.row("build", model=spec.name, seconds=secs, params=params, buffers=buffers, dtype=args.dtype)
        tables = {}
        for res in args.resolutions:

            def table(res=res, spec=spec, transformer=transformer):
                model = adapter(spec, transformer, res, device)
                samples = [1, args.branches, args.max_batch // model.forward_rows(spec.guidance)]
                if res != args.resolutions[0]:  # the other sizes: the cost per batch size only
                    samples = samples[:2]
                return forward_table(rec, spec, model, res, device, sorted(set(samples)), flops_per_row(spec, res),
                                     matmul_Fps)  # fmt: skip

            measured = guarded(rec, f"forward {spec.name} {res}px", table, budget, args)
            if measured:
                tables[res] = measured
            free(device)
        res = args.resolutions[0]
        if "rollout" in args.sections and res in tables:

            def main_rollout(spec=spec, transformer=transformer, res=res, reserve=reserve, table=tables[res]):
                model = adapter(spec, transformer, res, device)
                rows = section_rollout(rec, spec, model, res, device, args, table, budget, reserve)
                if spec.cfg_pair and "speedup_vs_naive" in rows.get("engine", {}):
                    sp = rows["engine"]["speedup_vs_naive"]
                    rec.target(f"{spec.name} {res}px: engine >= 2x the naive loop", sp, 2.0, sp >= 2.0,
                               N=rows["engine"]["N"])  # fmt: skip

            guarded(rec, f"rollout {spec.name} {res}px", main_rollout, budget, args)
            free(device)
        compile_now = []
        if "compile" in args.sections and res in tables and spec.cfg_pair:
            compile_now = [("compile", key, res, tables[res], args.compile_modes[0])]
            extras += [("compile", key, res, tables[res], mode) for mode in args.compile_modes[1:]]
        if "rollout" in args.sections:
            extras += [("rollout", key, r, tables[r], None) for r in args.resolutions[1:] if r in tables]
        if "train" in args.sections:
            section = f"train {spec.name} {res}px"
            if budget.left() - reserve < args.train_min_s and not args.no_budget:
                rec.skip(section, f"{budget.left():.0f} s left of the budget")
            else:
                guarded(rec, section, lambda spec=spec, transformer=transformer, res=res: section_train(
                    rec, spec, adapter(spec, transformer, res, device), res, device, args, args.train_reps),
                    budget, args)  # fmt: skip
        transformer = built = None
        free(device)
        for item in compile_now:
            run_extra(*item, reserve)

    for item in extras:
        run_extra(*item, 0.0)


def summary_table(rec: Recorder) -> str:
    lines = []
    ks = [r for r in rec.rows if r["section"] == "kernels"]
    if ks:
        lines.append("step kernels (fused vs the eager Flow-GRPO step):")
        lines.append(f"{'size':>22} {'B':>3} {'mode':<13} {'eager ms':>9} {'fused ms':>9} {'GB/s':>7} "
                     f"{'of copy':>7} {'x eager':>8}")  # fmt: skip
        for r in ks:
            lines.append(
                f"{r['size']:>22} {r['B']:>3} {r['mode']:<13} {r['eager_ms']:9.3f} {r['fused_ms']:9.3f} "
                f"{r['fused_GBps']:7.1f} {r['frac_copy_bw']:7.2f} {r['speedup_vs_eager']:8.1f}"
            )
    fs = [r for r in rec.rows if r["section"] == "forward"]
    if fs:
        lines.append("transformer forward (guided velocity):")
        for r in fs:
            lines.append(
                f"  {r['model']:>14} {r['res']:>5}px {r['samples']:>3} samples {r['rows']:>3} rows "
                f"{1e3 * r['seconds']:9.1f} ms  {r['ms_per_row']:7.2f} ms/row  {r['TFLOPs']:6.1f} TFLOP/s"
            )
    rs = [r for r in rec.rows if r["section"] == "rollout"]
    if rs:
        lines.append("TempFlow rollouts:")
        for r in rs:
            sp, se = r.get("speedup_vs_naive"), r.get("speedup_vs_engine")
            lines.append(
                f"  {r['model']:>14} {r['res']:>5}px N={r['N']} K={r['K']} T={r['T']} {r['variant']:<30} "
                f"{r['seconds']:8.2f} s {r['images_per_s']:8.2f} img/s  peak "
                f"{r.get('peak_GiB', float('nan')):5.1f} GiB"
                + (f"  x{sp:.2f} naive" if sp else "")
                + (f"  x{se:.2f} eager engine" if se else "")
            )
    ts = [r for r in rec.rows if r["section"] == "train"]
    if ts:
        lines.append("training step (forward + loss + backward):")
        for r in ts:
            lines.append(
                f"  {r['model']:>14} {r['res']:>5}px S={r['S']} K={r['K']} {r['variant']:<24} "
                f"{r['seconds']:8.3f} s  peak {r.get('peak_GiB', float('nan')):5.1f} GiB  "
                f"x{r['speedup_vs_per_action']:.2f}"
            )
    if rec.targets:
        met = sum(t["met"] for t in rec.targets)
        lines.append(f"targets met: {met} of {len(rec.targets)}")
        for t in rec.targets:
            if not t["met"]:
                lines.append(f"  missed: {t['target']} ({t['value']:.3g} vs {t['goal']:g})")
    for s in rec.skips:
        lines.append(f"skipped / scaled: {s}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--device", default=None, help="cuda (default when there is one) or cpu")
    ap.add_argument("--out", default=None, help="folder for gpu_real_size.jsonl (default: $OUT, else bench/results)")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: configs on the meta device, params, FLOPs, plan")
    ap.add_argument("--smoke", action="store_true", help="tiny configs of the same classes at 32 and 48 px, T=4, K=2, "
                    "N=2 (tests)")  # fmt: skip
    ap.add_argument("--budget-s", type=float, default=420.0, help="seconds this script may take (sizes are scaled "
                    "down or skipped to fit; default 420)")  # fmt: skip
    ap.add_argument("--no-budget", action="store_true", help="run every section at full size whatever it costs")
    ap.add_argument("--models", nargs="+", default=list(SPECS), choices=list(SPECS))
    ap.add_argument("--resolutions", nargs="+", type=int, default=None, help="pixels (default 512 1024)")
    ap.add_argument("--sections", nargs="+", default=["kernels", "rollout", "train", "compile"],
                    choices=["kernels", "rollout", "train", "compile"])  # fmt: skip
    ap.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="weights (default bf16; smoke fp32)")
    ap.add_argument("--seeds", type=int, default=4, help="N seeds per prompt (default 4)")
    ap.add_argument("--branches", type=int, default=6, help="K branches (default 6)")
    ap.add_argument("--steps", type=int, default=10, help="T steps (default 10)")
    ap.add_argument("--prompts", type=int, default=1, help="prompts per rollout (default 1)")
    ap.add_argument("--max-batch", type=int, default=48, help="engine's rows per forward (default 48, the default)")
    ap.add_argument("--states", type=int, default=6, help="S states per training step (default 6, the trainer's)")
    ap.add_argument("--lora-rank", type=int, default=32, help="LoRA rank of the training step (alpha 2x; default 32)")
    ap.add_argument("--no-lora", action="store_true", help="train every weight (bf16 gradients) instead of LoRA")
    ap.add_argument("--no-grad-checkpointing", action="store_true")
    ap.add_argument(
        "--compile-modes",
        nargs="+",
        default=["default", "reduce-overhead"],
        choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs", "dynamo-eager"],
        help="torch.compile modes of the compiled engine (reduce-overhead: with CUDA graphs)",
    )
    ap.add_argument(
        "--compile-scope",
        default="blocks",
        choices=["blocks", "model"],
        help="compile each transformer block (default: seconds to compile) or the whole model",
    )
    ap.add_argument("--kernel-batches", nargs="+", type=int, default=[4, 24])
    ap.add_argument("--reps", type=int, default=20, help="timed calls per kernel round")
    ap.add_argument("--train-reps", type=int, default=2)
    ap.add_argument("--reserve-s", type=float, default=90.0, help="seconds kept per model still to come")
    ap.add_argument("--train-min-s", type=float, default=20.0, help="skip a training step with less left")
    ap.add_argument("--extra-min-s", type=float, default=60.0, help="skip an extra section with less left")
    ap.add_argument("--compile-allowance-s", type=float, default=60.0, help="assumed seconds of one compile")
    ap.add_argument("--grace-s", type=float, default=30.0, help="a section still running this long after the "
                    "budget ran out is stopped (and reported as skipped)")  # fmt: skip
    args = ap.parse_args(argv)
    if args.seeds < 1 or args.branches < 1 or args.steps < 2 or args.prompts < 1 or args.prompts > len(PROMPTS):
        ap.error(f"need seeds >= 1, branches >= 1, steps >= 2 and 1 <= prompts <= {len(PROMPTS)}")
    if args.max_batch < 2:
        ap.error("--max-batch must be >= 2 (a CFG pair is two rows)")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() and not (args.dry_run or args.smoke) else "cpu"
    if args.out is None:
        args.out = os.environ.get("OUT") or os.path.join(BENCH, "results")
    if args.resolutions is None:
        args.resolutions = [32, 48] if args.smoke else [512, 1024]
    if any(r % 16 for r in args.resolutions):
        ap.error("resolutions must be multiples of 16")
    if args.dtype is None:
        args.dtype = "fp32" if args.smoke else "bf16"
    if args.smoke:  # every code path, small: T=4, K=2, N=2 unless given
        given = set(argv if argv is not None else sys.argv[1:])
        args.steps = args.steps if "--steps" in given else 4
        args.branches = args.branches if "--branches" in given else 2
        args.seeds = args.seeds if "--seeds" in given else 2
        args.states = args.states if "--states" in given else 2
        args.kernel_batches = [2]
        args.reps = min(args.reps, 3)
        args.train_reps = 1
        args.compile_modes = ["dynamo-eager"]  # dynamo traces the adapter's forward; no inductor on a CPU
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run or --smoke --device cpu", file=sys.stderr)
        return 2
    try:
        import diffusers  # noqa: F401
    except ImportError:
        print("diffusers is not installed: the real-size check builds diffusers' SD3 and FLUX transformers. On a lent "
              "GPU, carry its wheel in .whl/ (bench/gpu_check.sh installs .whl/*.whl).", file=sys.stderr)  # fmt: skip
        return 1
    torch.set_grad_enabled(True)
    mode = "dry-run" if args.dry_run else ("smoke" if args.smoke else "full")
    head = header(torch.device("cpu") if args.dry_run else device, mode, argv)
    rec = Recorder(args.out, head)
    budget = Budget(args.budget_s)
    print(
        f"{head['gpu']}  torch {head['torch']} (CUDA {head['cuda']})  triton {head['triton']}  diffusers "
        f"{head['diffusers']}  commit {head['commit']}  [{mode}, budget {args.budget_s:.0f} s]",
        flush=True,
    )
    try:
        if args.dry_run:
            dry_run(rec, args)
        else:
            if device.type == "cuda":
                torch.backends.cuda.matmul.allow_tf32 = True  # only the fp32 VAE stand-in; the model is bf16
            real_run(rec, args, device, budget)
    except Exception as exc:  # noqa: BLE001 - recorded; the exit code says it failed
        rec.error("main", exc)
    summary = {"seconds": budget.spent(), "failures": rec.failures, "skips": rec.skips,
               "targets_met": sum(t["met"] for t in rec.targets), "targets": len(rec.targets)}  # fmt: skip
    rec.close(summary)
    print(summary_table(rec))
    print(f"wrote {rec.path} ({budget.spent():.0f} s)")
    if rec.failures:
        print(f"\nFAILED: {len(rec.failures)} wrong or failed result(s):", file=sys.stderr)
        for f in rec.failures:
            print(f"  {f}", file=sys.stderr)
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
