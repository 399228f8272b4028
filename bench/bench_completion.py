"""How well a cheap completion of TempFlow-GRPO's branches ranks them, against the exact ODE completion.

    python bench/bench_completion.py                   # 10 prompts x 4 seeds, T=10, K=6, CFG 2, run seeds 0 1 2
    python bench/bench_completion.py --completions x0 euler:2 heun:2 --seeds 0

The embedded default (digits, its digit-correctness reward). For each run seed, one rollout with the exact completion
(``euler``: every remaining grid step) and one per cheap completion. The main paths and the branch samples do not
depend on the completion (the same counter-based noise), so the rows pair up one to one and only the rewards differ.
Per (prompt, seed, branch step) group of K rewards:

- Spearman: rank correlation of the cheap completion's K rewards with the exact ones (averaged over groups);
- sign agreement: the fraction of rows whose advantage (reward minus the group's mean, the sign the policy gradient
  follows) has the exact completion's sign;
- reward error: mean absolute difference of the rewards;
- calls: completion forwards per branch summed over the branch steps (exact: 45 at T=10), and the sampling forwards
  of one default iteration (2 prompts x 4 seeds; a CFG pair is one forward), with the rollout's seconds.

Also the within-group spread of the exact rewards per branch step (what adaptive branch steps would skip on).
Writes bench/results/bench_completion.jsonl and bench/results/completion_fidelity.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

DEFAULT = ["x0", "euler:2", "euler:3", "heun:2", "dpm2m:3", "euler:3,3,2,2,2,1", "euler:4,3,3,2,2,1",
           "dpm2m:4,3,3,2,2,1"]  # fmt: skip


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks along the last dimension (ties broken by position; rewards are continuous)."""
    return x.argsort(-1).argsort(-1).double()


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row of ``(G, K)``: the rank correlation of a and b."""
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    return (ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1))


def groups(batch, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards ``(G, K)`` and the branch step of each group (rows are in (prompt, seed, step, branch) order)."""
    return batch.reward.view(-1, K).double(), batch.step.view(-1, K)[:, 0]


def compare(exact, cheap, K: int, steps: list[int]) -> dict:
    re, step = groups(exact, K)
    rc, _ = groups(cheap, K)
    rho = spearman(rc, re)
    adv_e, adv_c = re - re.mean(-1, keepdim=True), rc - rc.mean(-1, keepdim=True)
    sign = (torch.sign(adv_e) == torch.sign(adv_c)).double().mean(-1)
    err = (rc - re).abs().mean(-1)
    out = {"spearman": rho.mean().item(), "sign": sign.mean().item(), "reward_error": err.mean().item(),
           "per_step": {}}  # fmt: skip
    for k in steps:
        m = step == k
        out["per_step"][k] = {"spearman": rho[m].mean().item(), "sign": sign[m].mean().item(),
                              "reward_error": err[m].mean().item()}  # fmt: skip
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--completions", nargs="+", default=DEFAULT)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--prompts", type=int, default=10, help="prompts per rollout (one per digit)")
    ap.add_argument("--per-prompt", type=int, default=4, help="seeds per prompt (N)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from tempflow.models.digits import DigitsModel
    from tempflow.prompts import digits_prompts
    from tempflow.rewards import DigitCorrectness
    from tempflow.rollout import BranchPlan, RolloutConfig, rollout

    model, reward = DigitsModel.load(), DigitCorrectness()
    T, K = 10, 6
    source = digits_prompts()
    prompts, meta = source.prompts[: args.prompts], source.metadata[: args.prompts]
    base = RolloutConfig(plan=BranchPlan.tempflow(T, K), seeds_per_prompt=args.per_prompt, guidance=2.0)
    steps = list(base.plan.sde_steps)
    results = {c: [] for c in args.completions}
    seconds = {c: [] for c in ["euler", *args.completions]}
    spread = []
    for seed in args.seeds:
        cfg = dataclasses.replace(base, seed=seed)
        t0 = time.perf_counter()
        exact = rollout(model, prompts, reward, cfg, metadata=meta)
        seconds["euler"].append(time.perf_counter() - t0)
        re, step = groups(exact, K)
        spread.append({k: re[step == k].std(-1).mean().item() for k in steps})
        for text in args.completions:
            plan = BranchPlan.tempflow(T, K, completion=text)
            t0 = time.perf_counter()
            cheap = rollout(model, prompts, reward, dataclasses.replace(cfg, plan=plan), metadata=meta)
            seconds[text].append(time.perf_counter() - t0)
            assert torch.equal(cheap.action, exact.action)  # the same branches; only their completion differs
            results[text].append(compare(exact, cheap, K, steps))
            r = results[text][-1]
            print(f"seed {seed} {text:>20}: spearman {r['spearman']:.3f} sign {r['sign']:.3f} "
                  f"error {r['reward_error']:.4f}", flush=True)  # fmt: skip

    def mean(values):
        return statistics.fmean(values)

    def sd(values):
        return statistics.pstdev(values) if len(values) > 1 else 0.0

    rows = []
    exact_plan = base.plan
    per_iteration = 2 * args.per_prompt  # the trainer's default: 2 prompts x N seeds
    for text in ["euler", *args.completions]:
        plan = BranchPlan.tempflow(T, K, completion=text)
        row = {"completion": str(plan.completion), "completion_calls": sum(plan.completion_calls().values()),
               "sampling_forwards_per_iteration": per_iteration * plan.model_calls_per_seed(),
               "rollout_s": mean(seconds[text]),
               "rollout_x_exact": mean(seconds["euler"]) / mean(seconds[text])}  # fmt: skip
        if text != "euler":
            got = results[text]
            for key in ("spearman", "sign", "reward_error"):
                row[key] = mean([g[key] for g in got])
                row[key + "_sd"] = sd([g[key] for g in got])
            row["per_step"] = {k: {key: mean([g["per_step"][k][key] for g in got]) for key in ("spearman", "sign")}
                               for k in steps}  # fmt: skip
        rows.append(row)
    record = {**harness.header(), "model": "digits", "T": T, "K": K, "prompts": args.prompts,
              "per_prompt": args.per_prompt, "guidance": 2.0, "seeds": args.seeds, "threads": args.threads,
              "exact_spread_per_step": {k: mean([s[k] for s in spread]) for k in steps}, "rows": rows,
              "exact_calls_per_seed": exact_plan.model_calls_per_seed()}  # fmt: skip
    table = render(record)
    print(table)
    if not args.no_write:
        print("wrote", harness.write("bench_completion", record))
        with open(os.path.join(harness.RESULTS, "completion_fidelity.md"), "w") as fh:
            fh.write(table + "\n")
    return 0


def render(record: dict) -> str:
    steps = list(record["exact_spread_per_step"])
    n = len(record["seeds"])
    lines = [
        f"Cheap completions against the exact one: digits default, {record['prompts']} prompts x "
        f"{record['per_prompt']} seeds, T={record['T']}, K={record['K']}, CFG {record['guidance']}, digit reward; "
        f"mean ± sd over {n} run seed(s) ({record['commit']}, {record['device']}, {record['threads']} threads). "
        "Calls: completion forwards per branch summed over the branch steps; forwards / iteration: sampling "
        "forwards of a default iteration (2 prompts x 4 seeds, a CFG pair counted once).",
        "",
        "| completion | calls | forwards / iteration | rollout x exact | Spearman | sign agreement | reward error | "
        "Spearman per branch step " + " ".join(map(str, steps)) + " |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in record["rows"]:
        if "spearman" not in r:
            lines.append(f"| {r['completion']} (exact) | {r['completion_calls']} | "
                         f"{r['sampling_forwards_per_iteration']} | 1.00 | 1 | 1 | 0 | - |")  # fmt: skip
            continue
        per = " ".join(f"{r['per_step'][k]['spearman']:.2f}" for k in r["per_step"])
        lines.append(
            f"| {r['completion']} | {r['completion_calls']} | {r['sampling_forwards_per_iteration']} | "
            f"{r['rollout_x_exact']:.2f} | {r['spearman']:.3f} ± {r['spearman_sd']:.3f} | "
            f"{r['sign']:.3f} ± {r['sign_sd']:.3f} | {r['reward_error']:.4f} | {per} |"
        )
    spread = " ".join(f"{record['exact_spread_per_step'][k]:.3f}" for k in steps)
    lines += ["", f"Within-group reward spread of the exact completion (std of the K rewards) per branch step "
              f"{' '.join(map(str, steps))}: {spread}."]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
