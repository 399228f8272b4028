"""Rollouts: the batched tree engine against the naive official-style loop (same rows, checked here first).

TempFlow-GRPO plan, T=10, K=6 branches at steps 0..8, N=4 seeds per prompt, classifier-free guidance, digit reward.
Models: the embedded digits model (0.6M parameters) and a larger random-weight SD3-architecture transformer.
Reports model calls, wall time, images per second, the share of wall time spent outside the model forward (the
engine's own overhead), and the per-sample forward cost at each batch size, which bounds what batching can gain
on this machine.

    python bench/bench_rollout.py [--prompts 2] [--caps 64 512] [--quick]

Caps are ``max_batch``: rows per forward, a CFG pair counting two (64 and 512 rows are the 32 and 256 guided
samples per call of the results recorded before caps counted rows).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

from tempflow.models import digits as dg  # noqa: E402
from tempflow.rewards import DigitCorrectness  # noqa: E402
from tempflow.rollout import BranchPlan, RolloutConfig, naive_rollout, rollout  # noqa: E402


class Timed:
    """Counts and times the model's forwards (the part the engine cannot speed up per sample)."""

    def __init__(self, model):
        self.model, self.calls, self.seconds, self.samples = model, 0, 0.0, 0
        self.inner = model.forward_velocity
        model.forward_velocity = self

    def __call__(self, x, t, cond):
        start = time.perf_counter()
        out = self.inner(x, t, cond)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        self.samples += x.shape[0]
        return out

    def reset(self):
        self.calls, self.seconds, self.samples = 0, 0.0, 0


def larger_model(seed=0):
    """An SD3-architecture model of about 5M parameters on the digits task shape (random weights)."""
    torch.manual_seed(seed)
    cfg = dg.DigitsConfig(num_layers=6, attention_head_dim=32, num_attention_heads=4, text_dim=128)
    return dg.DigitsModel(cfg)


def forward_cost(model, batches, reps=3):
    """Seconds per sample of one guided forward at each batch size."""
    cond = model.encode([dg.prompt_for(3)])
    out = {}
    for b in batches:
        x = torch.randn(b, *model.latent_shape)
        index = torch.zeros(b, dtype=torch.long)
        t = harness.time_fn(lambda x=x, index=index: model.velocity(x, 0.5, cond, index, 2.0), warmup=1, reps=reps)
        out[b] = t["median_s"] / b
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=2, help="prompts (default 2: 8 seeds with N=4)")
    parser.add_argument("--caps", type=int, nargs="+", default=[64, 512],
                        help="engine's max_batch: rows per forward, a CFG pair counting two")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="T=4, K=2 smoke run")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    T, K = (4, 2) if args.quick else (10, 6)
    plan = BranchPlan.tempflow(T, K)
    prompts = [dg.prompt_for(d % 10) for d in range(3, 3 + args.prompts)]
    reward = DigitCorrectness()
    head = harness.header("cpu")
    rows = []
    for name, model in (("digits 0.6M", dg.DigitsModel.load()), ("sd3-arch larger", larger_model())):
        params = sum(p.numel() for p in model.net.parameters())
        timed = Timed(model)
        results = {}
        runs = [("naive", naive_rollout, args.caps[0])] + [(f"engine cap {c}", rollout, c) for c in args.caps]
        for variant, fn, cap in runs:
            cfg = RolloutConfig(plan=plan, seeds_per_prompt=4, guidance=2.0, max_batch=cap)
            timed.reset()
            stats = {}
            start = time.perf_counter()
            batch = fn(model, prompts, reward, cfg, stats=stats)
            wall = time.perf_counter() - start
            results[variant] = batch
            rows.append({
                "model": name, "params_M": params / 1e6, "variant": variant, "model_calls": timed.calls,
                "samples_forwarded": timed.samples, "wall_s": wall, "images": batch.images.shape[0],
                "images_per_s": batch.images.shape[0] / wall, "forward_s": timed.seconds,
                "outside_forward": 1 - timed.seconds / wall, "largest_batch": stats["largest_batch"],
                "peak_live_items": stats["peak_live_items"],
            })  # fmt: skip
        naive_wall = rows[-len(runs)]["wall_s"]
        for row in rows[-len(runs) + 1 :]:
            row["speedup"] = naive_wall / row["wall_s"]
        a, b = results[runs[-1][0]], results["naive"]
        rows[-1]["same_rows"] = bool(
            torch.equal(a.step, b.step) and torch.allclose(a.old_log_prob, b.old_log_prob, atol=1e-4)
        )
        cost = forward_cost(model, (1, 6, 12, 24, 48, 96, 192))
        rows[-1]["forward_s_per_sample"] = {str(k): v for k, v in cost.items()}
        print(f"{name}: per-sample forward ms by batch: " + ", ".join(f"{k}: {1e3 * v:.3f}" for k, v in cost.items()))
    cols = [
        ("model", "model", ""),
        ("params_M", "params M", ".2f"),
        ("variant", "variant", ""),
        ("model_calls", "calls", "d"),
        ("samples_forwarded", "samples", "d"),
        ("wall_s", "wall s", ".2f"),
        ("images_per_s", "images/s", ".1f"),
        ("outside_forward", "outside fwd", ".3f"),
        ("largest_batch", "max batch", "d"),
        ("peak_live_items", "live items", "d"),
        ("speedup", "x naive", ".2f"),
    ]
    print(f"{head['device']}  torch {head['torch']}  commit {head['commit']}  T={T} K={K} N=4 "
          f"prompts={len(prompts)}")  # fmt: skip
    print(harness.table(rows, cols))
    path = harness.write("bench_rollout", {**head, "T": T, "K": K, "N": 4, "prompts": len(prompts), "caps": args.caps,
                                           "quick": args.quick, "rows": rows})  # fmt: skip
    print(f"appended to {os.path.relpath(path)}")


if __name__ == "__main__":
    main()
