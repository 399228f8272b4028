"""One benchmark harness for every bench_<thing>.py: timing with warm-up excluded, median and spread, a measured
copy bandwidth as the ceiling, and results appended as JSON lines under bench/results/ with a header naming the
device, torch version and commit. Ratios between variants are taken in one run (these machines are noisy)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _summary(samples: list[float]) -> dict:
    samples = sorted(samples)
    q = lambda p: samples[min(len(samples) - 1, int(p * (len(samples) - 1) + 0.5))]  # noqa: E731
    return {"median_s": statistics.median(samples), "p10_s": q(0.1), "p90_s": q(0.9), "reps": len(samples)}


def time_fn(fn: Callable[[], object], device: torch.device | str = "cpu", warmup: int = 3, reps: int = 15) -> dict:
    """Run ``fn`` ``warmup`` times untimed, then ``reps`` times; seconds per call as median, p10 and p90."""
    return compare({"fn": fn}, device, warmup, reps)["fn"]


def compare(
    fns: dict[str, Callable[[], object]], device: torch.device | str = "cpu", warmup: int = 3, reps: int = 15
) -> dict[str, dict]:
    """Time several variants of the same work in one run, interleaved round-robin so that a slow phase of a noisy
    machine hits all of them alike. Returns ``{name: time_fn-style summary}``."""
    device = torch.device(device)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            _sync(device)
            samples[name].append(time.perf_counter() - start)
    return {name: _summary(s) for name, s in samples.items()}


def copy_bandwidth(device: torch.device | str = "cpu", nbytes: int = 256 << 20) -> float:
    """Measured bytes/s of a device copy (bytes read plus bytes written): the ceiling for memory-bound ops."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    stats = time_fn(lambda: dst.copy_(src), device, warmup=2, reps=10)
    return 2 * nbytes / stats["median_s"]


def header(device: torch.device | str = "cpu") -> dict:
    device = torch.device(device)
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=os.path.dirname(RESULTS)
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=os.path.dirname(RESULTS),
        ).stdout.strip()
    except OSError:
        commit, dirty = "", ""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": name,
        "torch": torch.__version__,
        "commit": (commit or "unknown") + ("+dirty" if dirty else ""),
        "python": platform.python_version(),
    }


def write(name: str, record: dict) -> str:
    """Append ``record`` as one JSON line to bench/results/<name>.jsonl; returns the path."""
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.jsonl")
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")
    return path


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Plain text table: ``columns`` are (key, title, format)."""
    widths = [max(len(title), 10) for _, title, _ in columns]
    lines = ["  ".join(title.rjust(w) for (_, title, _), w in zip(columns, widths, strict=True))]
    for row in rows:
        cells = []
        for (key, _, fmt), w in zip(columns, widths, strict=True):
            value = row.get(key, "")
            cells.append((format(value, fmt) if value != "" else "").rjust(w))
        lines.append("  ".join(cells))
    return "\n".join(lines)
