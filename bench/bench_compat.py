"""tempflow.compat against the peers' own functions, called the way the peers call them.

Baselines (the real conventions, not rewrites): Flow-GRPO's ``sde_step_with_logprob``
(tempflow/compat/flow_grpo_eager.py) and TempFlow-GRPO's per-step function and training scorer (test copies under
tests/peers/), each on a scheduler whose ``index_for_timestep`` is diffusers' (one ``.nonzero()`` and one ``.item()``
per timestep value). Inputs as the peers pass them: fp32 latents (their pipelines carry ``latents.float()``), the
velocity in fp32 or bf16, sampling with a generator and a length-1 timestep (``t.unsqueeze(0)``), scoring with
per-sample timesteps and given next latents (training). Outputs are checked against the baseline before timing;
the two are interleaved call by call (harness.compare) at each thread count.

Rows (target speed-ups from issue 13 for SD3.5-M 512 px latents, B = 24):

  flow-grpo  score     prev_sample given, no grad (Flow-GRPO's reference-model pass)  >= 5x
  flow-grpo  sample    generator noise (Flow-GRPO pipeline)                          >= 2.5x
  flow-grpo  train     prev_sample given, forward and backward of log-prob and mean  (no target)
  tempflow   perstep   K = 6 branches from generator noise (TempFlow-GRPO pipeline)  >= 3x
  tempflow   ode       determistic=True (the per-step pipeline's ODE steps)          (no target)
  tempflow   score     prev_sample given, no grad (TempFlow-GRPO scorer)             (no target)
  tempflow   train     prev_sample given, forward and backward (TempFlow-GRPO loss)  (no target)

Two timings per row, in the same run: ``interleaved`` (harness.compare: original, ours, original, ... so a slow
phase of the machine hits both; each call then follows the other's frees, and on this CPU a fresh output costs
page faults, about 2 ms per 6 MB) and ``alone`` (each variant in its own block after warm-up: its steady state,
where the allocator reuses its own freed memory). The targets are judged on the interleaved ratio.

``--allocator no-trim`` re-runs the benchmark under ``GLIBC_TUNABLES`` that keep freed memory in the heap (no
trimming, no ``mmap`` for large blocks): after warm-up no call page-faults, so the ratio is that of the arithmetic
and memory traffic alone. With the default allocator the original's timing swings by several times between
identical calls, with the allocator's state.

    python bench/bench_compat.py [--threads 1,2] [--quick] [--full] [--allocator default|no-trim] [--device cpu]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
import harness  # noqa: E402
from peers import loader  # noqa: E402

from tempflow.compat import flow_grpo, tempflow_grpo  # noqa: E402
from tempflow.compat.flow_grpo_eager import EagerScheduler, eager_sde_step_with_logprob  # noqa: E402
from tempflow.sde import time_grid  # noqa: E402

PERSTEP = loader.load("tempflow_grpo", "sd3_sde_with_logprob_perstep").sde_step_with_logprob
SCORER = loader.load("tempflow_grpo", "sd3_sde_with_logprob").sde_step_with_logprob

SHAPES = {"sd3.5-m 512px": (16, 64, 64), "flux 1024px": (4096, 64)}
NO_TRIM = "glibc.malloc.trim_threshold=4294967295:glibc.malloc.mmap_max=0"
TARGETS = {("flow-grpo", "score"): 5.0, ("flow-grpo", "sample"): 2.5, ("tempflow", "perstep"): 3.0}


def _train(fn, sched, v, ts, x, prev, **kw):
    """A training call: the log-prob and the mean of given samples, differentiated in the velocity."""
    v = v.detach().requires_grad_(True)
    out = fn(sched, v, ts, x, prev_sample=prev, **kw)
    (out[1].sum() + out[2].square().mean()).backward()
    return out[1].detach(), out[2].detach(), v.grad


def _calls(sched, x, v, prev, ts_one, ts_rows, device):
    """{(codebase, call): (original, ours)} as zero-argument callables."""
    g = lambda: torch.Generator(device).manual_seed(0)  # noqa: E731
    fg, tg = flow_grpo.sde_step_with_logprob, tempflow_grpo
    return {
        ("flow-grpo", "score"): (
            functools.partial(eager_sde_step_with_logprob, sched, v, ts_rows, x, 0.7, prev),
            functools.partial(fg, sched, v, ts_rows, x, 0.7, prev),
        ),
        ("flow-grpo", "sample"): (
            lambda: eager_sde_step_with_logprob(sched, v, ts_one, x, 0.7, generator=g()),
            lambda: fg(sched, v, ts_one, x, 0.7, generator=g()),
        ),
        ("flow-grpo", "train"): (
            functools.partial(_train, eager_sde_step_with_logprob, sched, v, ts_rows, x, prev, noise_level=0.7),
            functools.partial(_train, fg, sched, v, ts_rows, x, prev, noise_level=0.7),
        ),
        ("tempflow", "perstep"): (
            lambda: PERSTEP(sched, v, ts_one, x, generator=g()),
            lambda: tg.sde_step_with_logprob_perstep(sched, v, ts_one, x, generator=g()),
        ),
        ("tempflow", "ode"): (
            lambda: PERSTEP(sched, v, ts_one, x, determistic=True),
            lambda: tg.sde_step_with_logprob_perstep(sched, v, ts_one, x, determistic=True),
        ),
        ("tempflow", "score"): (
            functools.partial(SCORER, sched, v, ts_rows, x, prev),
            functools.partial(tg.sde_step_with_logprob, sched, v, ts_rows, x, prev),
        ),
        ("tempflow", "train"): (
            functools.partial(_train, SCORER, sched, v, ts_rows, x, prev),
            functools.partial(_train, tg.sde_step_with_logprob, sched, v, ts_rows, x, prev),
        ),
    }


def _check(ours, theirs) -> None:
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape, (a.shape, b.shape)
        scale = max(float(b.abs().max()), 1.0)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * scale)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts (CPU)")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (CI smoke run)")
    parser.add_argument("--full", action="store_true", help="also FLUX 1024 px latents and B = 1")
    parser.add_argument(
        "--allocator",
        choices=("default", "no-trim"),
        default="default",
        help="no-trim: glibc keeps freed memory (no page faults after warm-up); re-executes this script",
    )
    args = parser.parse_args()
    if args.allocator == "no-trim" and os.environ.get("GLIBC_TUNABLES") != NO_TRIM:
        os.environ["GLIBC_TUNABLES"] = NO_TRIM  # read by glibc at process start: run again
        os.execv(sys.executable, [sys.executable, *sys.argv])
    device = torch.device(args.device)
    reps = 3 if args.quick else 21
    threads = [int(t) for t in args.threads.split(",")] if device.type == "cpu" else [torch.get_num_threads()]
    sched = EagerScheduler(time_grid(10, shift=3.0, device=device))
    load_before = os.getloadavg()
    shapes = SHAPES if args.full else {"sd3.5-m 512px": SHAPES["sd3.5-m 512px"]}
    batches = (1, 24) if args.full else (24,)
    rows = []
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        bw = harness.copy_bandwidth(device)
        for name, shape in shapes.items():
            for batch in batches:
                for vdtype in (torch.float32, torch.bfloat16):
                    gen = torch.Generator().manual_seed(batch)
                    x = torch.randn(batch, *shape, generator=gen).to(device)
                    v = torch.randn(batch, *shape, generator=gen).to(device, vdtype)
                    prev = torch.randn(batch, *shape, generator=gen).to(device)
                    ts_one = sched.timesteps[3:4]
                    ts_rows = sched.timesteps[torch.arange(batch, device=device) % 9]
                    for (codebase, call), (theirs, ours) in _calls(sched, x, v, prev, ts_one, ts_rows, device).items():
                        _check(ours(), theirs())
                        times = harness.compare({"original": theirs, "ours": ours}, device, reps=reps)
                        t0, t1 = times["original"], times["ours"]
                        a0 = harness.time_fn(theirs, device, reps=reps)
                        a1 = harness.time_fn(ours, device, reps=reps)
                        target = TARGETS.get((codebase, call)) if (name, batch) == ("sd3.5-m 512px", 24) else None
                        speedup = t0["median_s"] / t1["median_s"]
                        rows.append(
                            {
                                "threads": n_threads,
                                "shape": name,
                                "B": batch,
                                "velocity": str(vdtype).replace("torch.", ""),
                                "codebase": codebase,
                                "call": call,
                                "original_ms": 1e3 * t0["median_s"],
                                "original_p90_ms": 1e3 * t0["p90_s"],
                                "ours_ms": 1e3 * t1["median_s"],
                                "ours_p90_ms": 1e3 * t1["p90_s"],
                                "speedup": speedup,
                                "alone_original_ms": 1e3 * a0["median_s"],
                                "alone_ours_ms": 1e3 * a1["median_s"],
                                "alone_speedup": a0["median_s"] / a1["median_s"],
                                "target": target,
                                "met": None if target is None else speedup >= target,
                                "copy_GBps": bw / 1e9,
                            }
                        )
    head = harness.header(device)
    load_after = os.getloadavg()
    print(f"{head['device']}  torch {head['torch']}  commit {head['commit']}")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (on {os.cpu_count()} CPUs)")
    print(f"allocator: {args.allocator}")
    cols = [
        ("threads", "threads", "d"),
        ("shape", "shape", ""),
        ("B", "B", "d"),
        ("velocity", "velocity", ""),
        ("codebase", "codebase", ""),
        ("call", "call", ""),
        ("original_ms", "original ms", ".2f"),
        ("ours_ms", "ours ms", ".2f"),
        ("speedup", "speedup", ".2f"),
        ("alone_original_ms", "alone orig", ".2f"),
        ("alone_ours_ms", "alone ours", ".2f"),
        ("alone_speedup", "alone x", ".2f"),
        ("target", "target", ""),
        ("met", "met", ""),
    ]
    printable = [
        {**r, "target": "" if r["target"] is None else f">={r['target']:g}", "met": r["met"] or ""} for r in rows
    ]
    for r, p in zip(rows, printable, strict=True):
        if r["met"] is False:
            p["met"] = "MISSED"
        elif r["met"]:
            p["met"] = "yes"
    print(harness.table(printable, cols))
    record = {
        **head,
        "quick": args.quick,
        "allocator": args.allocator,
        "load_before": load_before,
        "load_after": load_after,
        "rows": rows,
    }
    path = harness.write("bench_compat", record)
    print(f"appended to {os.path.relpath(path)}")


if __name__ == "__main__":
    main()
