"""The K-branch SDE step and the K-action GRPO loss: fused ops against the eager code of the public codebases.

Variants, timed interleaved in one run (bench/harness.py):
  eager      Flow-GRPO's step as written (tempflow.compat.flow_grpo_eager): upcasts, one ``.item()`` index lookup
             per sample, ``repeat_interleave(K)`` of state, velocity and timesteps for the branches, a separate
             ``randn``, the log-prob expression, the mean; for the loss, the official TempFlow-GRPO training code:
             the same step scoring each of the K actions on a K-times-repeated velocity, the clipped objective,
             autograd backward.
  reference  tempflow's pure-torch reference (backend="torch"), noise drawn by torch.randn.
  fused      tempflow.ops on this device's backend; ``fused`` draws its noise inside the kernel from the
             counter-based stream (keys), ``fused+noise`` reads a given noise tensor.

Sizes: SD3.5-M at 512 px (16x64x64 latents) and FLUX at 1024 px (4096x64 packed tokens); B in {1, 24}; K in {1, 6};
state fp32, velocity bf16 (what a bf16 model returns). Modes: sample, score, loss (forward + backward).

    python bench/bench_step.py [--device cuda] [--quick] [--sizes sd3 flux]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

from tempflow import objective, ops, rng, sde  # noqa: E402
from tempflow.compat.flow_grpo_eager import EagerScheduler, eager_sde_step_with_logprob  # noqa: E402

SIZES = {"sd3": ("sd3.5-m 512px", (16, 64, 64)), "flux": ("flux 1024px", (4096, 64))}
CLIP, BETA = 1e-4, 0.004


def eager_sample(sched, x, v, ts, K, gen):
    """Flow-GRPO-style branches: repeat the batch K times and take one eager SDE step."""
    xr, vr, tr = x.repeat_interleave(K, 0), v.repeat_interleave(K, 0), ts.repeat_interleave(K, 0)
    return eager_sde_step_with_logprob(sched, vr, tr, xr, 0.7, generator=gen)[:2]


def eager_score(sched, x, v, ts, actions):
    K = actions.shape[1]
    xr, vr, tr = x.repeat_interleave(K, 0), v.repeat_interleave(K, 0), ts.repeat_interleave(K, 0)
    return eager_sde_step_with_logprob(sched, vr, tr, xr, 0.7, prev_sample=actions.flatten(0, 1))[1]


def eager_loss(sched, x, v_leaf, ts, actions, old, adv, w, v_ref, table, steps):
    """The official TempFlow-GRPO loss: the forward repeated for each of the K actions, autograd backward."""
    B, K = actions.shape[:2]
    vr = v_leaf.repeat_interleave(K, 0)
    xr, tr = x.repeat_interleave(K, 0), ts.repeat_interleave(K, 0)
    _, logp, mean, _ = eager_sde_step_with_logprob(sched, vr, tr, xr, 0.7, prev_sample=actions.flatten(0, 1))
    _, _, mean_ref, std_dev = eager_sde_step_with_logprob(
        sched, v_ref.repeat_interleave(K, 0), tr, xr, 0.7, prev_sample=actions.flatten(0, 1)
    )
    std = sde.at_step(table.std, steps.repeat_interleave(K, 0), xr)
    kl = ((mean - mean_ref) ** 2).mean(dim=tuple(range(1, xr.dim()))) / (2 * std.reshape(-1) ** 2)
    loss = objective.grpo_objective(logp.view(B, K), old, adv, w, CLIP) + BETA * kl.mean()
    loss.backward()
    return loss


def fused_loss(backend, x, v_leaf, steps, table, actions, old, adv, w, v_ref):
    loss = ops.branch_grpo_loss(v_leaf, x, actions, steps, table, old, adv, w, CLIP, BETA, v_ref, backend=backend)
    loss.backward()
    return loss


def run_case(device, label, shape, B, K, reps, backend):
    grid = sde.time_grid(10, shift=3.0, device=device)
    table = sde.sde_table(grid, "flow-grpo", 0.7)
    sched = EagerScheduler(grid)
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(B, *shape, device=device, generator=g)
    v = torch.randn(B, *shape, device=device, generator=g).to(torch.bfloat16)
    v_ref = (v.float() + 0.05 * torch.randn(v.shape, device=device, generator=g)).to(torch.bfloat16)
    steps = torch.arange(B, device=device) % 9
    ts = grid.timesteps[steps]
    ids = torch.stack(torch.meshgrid(torch.arange(B), torch.arange(K), indexing="ij"), -1).to(device)
    keys = rng.stream_keys(0, ids)
    noise = torch.randn(B, K, *shape, device=device, generator=g)
    acts = ops.branch_step(x, v, steps, table, K, noise=noise, backend=backend)
    old = acts.log_prob + 1e-4 * torch.randn(B, K, device=device, generator=g)
    adv = torch.randn(B, K, device=device, generator=g)
    w = torch.rand(B, device=device, generator=g) + 0.5
    d = x[0].numel()
    n = B * d
    leaf = lambda: v.detach().clone().requires_grad_(True)  # noqa: E731

    modes = {
        "sample": (
            {
                "eager": lambda: eager_sample(sched, x, v, ts, K, torch.Generator(device).manual_seed(1)),
                "reference": lambda: ops.branch_step(
                    x, v, steps, table, K, noise=torch.randn(B, K, *shape, device=device), backend="torch"
                ),
                "fused": lambda: ops.branch_step(x, v, steps, table, K, keys=keys, backend=backend),
                "fused+noise": lambda: ops.branch_step(x, v, steps, table, K, noise=noise, backend=backend),
            },
            n * (4 + 2) + B * K * d * 4,  # read x (fp32) and v (bf16), write K samples (fp32)
        ),
        "score": (
            {
                "eager": lambda: eager_score(sched, x, v, ts, acts.samples),
                "reference": lambda: ops.branch_score(x, v, steps, table, acts.samples, backend="torch"),
                "fused": lambda: ops.branch_score(x, v, steps, table, acts.samples, backend=backend),
            },
            n * (4 + 2) + B * K * d * 4,  # read x, v and the K samples
        ),
        "loss fwd+bwd": (
            {
                "eager": lambda: eager_loss(sched, x, leaf(), ts, acts.samples, old, adv, w, v_ref, table, steps),
                "reference": lambda: fused_loss("torch", x, leaf(), steps, table, acts.samples, old, adv, w, v_ref),
                "fused": lambda: fused_loss(backend, x, leaf(), steps, table, acts.samples, old, adv, w, v_ref),
            },
            # forward reads x, v, v_ref, K actions; backward reads them again and writes the bf16 gradient
            2 * (n * (4 + 2 + 2) + B * K * d * 4) + n * 2,
        ),
    }
    rows = []
    for mode, (fns, moved) in modes.items():
        times = harness.compare(fns, device, warmup=1, reps=reps)
        eager = times["eager"]["median_s"]
        for name, t in times.items():
            rows.append(
                {
                    "size": label,
                    "B": B,
                    "K": K,
                    "mode": mode,
                    "variant": name,
                    "median_ms": 1e3 * t["median_s"],
                    "p10_ms": 1e3 * t["p10_s"],
                    "p90_ms": 1e3 * t["p90_s"],
                    "GBps": moved / t["median_s"] / 1e9,
                    "speedup_vs_eager": eager / t["median_s"],
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="B=1 and fewer repetitions (CI smoke run)")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per variant")
    args = parser.parse_args()
    device = torch.device(args.device)
    backend = ops.resolve_backend(device)
    bw = harness.copy_bandwidth(device)
    head = harness.header(device)
    rows = []
    for key in args.sizes:
        label, shape = SIZES[key]
        for B in (1,) if args.quick else (1, 24):
            for K in (1, 6):
                big = B * K * torch.Size(shape).numel() > 4e6
                reps = args.reps or (2 if args.quick else (5 if big else 15))
                rows += run_case(device, label, shape, B, K, reps, backend)
    for r in rows:
        r["frac_copy_bw"] = r["GBps"] * 1e9 / bw
    print(f"{head['device']}  torch {head['torch']}  commit {head['commit']}  backend {backend}  "
          f"copy bandwidth {bw / 1e9:.1f} GB/s")  # fmt: skip
    cols = [
        ("size", "size", ""),
        ("B", "B", "d"),
        ("K", "K", "d"),
        ("mode", "mode", ""),
        ("variant", "variant", ""),
        ("median_ms", "median ms", ".2f"),
        ("p90_ms", "p90 ms", ".2f"),
        ("GBps", "GB/s", ".1f"),
        ("frac_copy_bw", "of copy bw", ".2f"),
        ("speedup_vs_eager", "x eager", ".2f"),
    ]
    print(harness.table(rows, cols))
    path = harness.write("bench_step", {**head, "backend": backend, "copy_GBps": bw / 1e9, "quick": args.quick,
                                        "rows": rows})  # fmt: skip
    print(f"appended to {os.path.relpath(path)}")


if __name__ == "__main__":
    main()
