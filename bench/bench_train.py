"""The study: TempFlow-GRPO against Flow-GRPO on the embedded default, by model calls and by wall-clock seconds, with
error bars over seeds, the ablations (branching, noise-aware weighting, seed groups), three noise schedules, three
group shapes, a reward-hacking monitor, and the time split of an iteration against the naive official-style loop.

    python bench/bench_train.py            # the whole study: 27 runs, 2 at a time, under an hour on a 2-core CPU
    python bench/bench_train.py --quick    # the 3 main runs, one seed, half a TempFlow iteration's budget (CI)

Every run gets the same budget of model calls (samples through the transformer, sampling and training; a CFG pair
counts 2): the cost of ``--budget`` TempFlow iterations at the default 4x6 group. Held-out evaluation (deterministic
ODE, noise never used in training, 10 prompts x ``--per-digit`` samples) at 0, 1/4, 1/2, 3/4 and all of the budget:
- agreement: the reward's classifier reads the prompt's digit (T=10; T=40 at the end);
- reward: that classifier's probability of the prompt's digit;
- second-classifier agreement: a classifier the reward never sees (other seed and width), the hacking monitor;
- diversity: mean pairwise pixel distance of a prompt's samples, relative to the base model's (collapse -> 0);
- KL: the exact per-step KL of the policy to the base model (adapters off) along the ODE path, mean over steps.
Wall-clock seconds count rollout and training only (not evaluation); runs execute 2 at a time, one thread each.
Writes bench/results/study.jsonl (one line per run and evaluation point), study_*.png and study_table.md.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import RESULTS, header  # noqa: E402

# The study ran before the trainer's default became 6 states per optimizer step; its TempFlow variants keep the
# setting they ran with (36: 2 updates per iteration), and the probe below shows what 6 does.
TEMPFLOW = dict(method="tempflow", weighting=True, group="seed", states_per_step=36)
FLOW_GRPO_G = 24  # Flow-GRPO's group size; TempFlow's N x K = 24 rewards per step, too
VARIANTS = {
    "tempflow": TEMPFLOW,
    "flow-grpo (global std)": dict(
        method="flow-grpo", group="global", seeds_per_prompt=FLOW_GRPO_G, states_per_step=36
    ),
    "flow-grpo (prompt std)": dict(
        method="flow-grpo", group="prompt", seeds_per_prompt=FLOW_GRPO_G, states_per_step=36
    ),
    "branching": dict(TEMPFLOW, weighting=False, group="prompt"),
    "branching + weighting": dict(TEMPFLOW, group="prompt"),
    "schedule cps (a 0.7)": dict(TEMPFLOW, schedule="cps", noise_level=0.7),
    "schedule dance (a 0.3)": dict(TEMPFLOW, schedule="dance", noise_level=0.3),
    "shape 2x12": dict(TEMPFLOW, seeds_per_prompt=2, branches=12),
    "shape 6x4": dict(TEMPFLOW, seeds_per_prompt=6, branches=4),
    # a probe, not in the paper: as many optimizer steps per iteration as Flow-GRPO makes (432 states / 36)
    "tempflow 12 updates/iteration": dict(TEMPFLOW, states_per_step=6),
    # cheaper completions of the branches (issue 15), on the trainer's default of 6 states per optimizer step
    "tempflow euler:2": dict(TEMPFLOW, states_per_step=6, completion="euler:2"),
    "tempflow euler:3": dict(TEMPFLOW, states_per_step=6, completion="euler:3"),
    "tempflow x0": dict(TEMPFLOW, states_per_step=6, completion="x0"),
    # adaptive branch steps on top: skip steps whose spread stays under 35% of the widest (the last 3 of 9 in
    # bench_completion's spread), every 10th iteration runs all
    "tempflow euler:2 adaptive": dict(TEMPFLOW, states_per_step=6, completion="euler:2", skip_spread=0.35),
}
GROUPS = {
    "main": ["tempflow", "flow-grpo (global std)", "flow-grpo (prompt std)"],
    "ablation": ["branching", "branching + weighting", "tempflow"],
    "schedule": ["tempflow", "schedule cps (a 0.7)", "schedule dance (a 0.3)"],
    "shape": ["shape 2x12", "tempflow", "shape 6x4"],
    "updates": ["tempflow", "tempflow 12 updates/iteration", "flow-grpo (global std)"],
    "completion": [
        "tempflow 12 updates/iteration",
        "tempflow euler:3",
        "tempflow euler:2",
        "tempflow x0",
        "tempflow euler:2 adaptive",
        "flow-grpo (global std)",
        "flow-grpo (prompt std)",
    ],  # fmt: skip
}
EVAL_SEED = 987_654  # noise streams no training run draws (runs use seeds 0, 1, 2)
FRACTIONS = (0.25, 0.5, 0.75, 1.0)


class Counted:
    """Counts the samples that go through the model's transformer (a CFG pair counts 2)."""

    def __init__(self, model):
        self.model, self.calls, self.paused = model, 0, False
        inner = model.forward_velocity

        def forward_velocity(x, t, cond):
            if not self.paused:
                self.calls += x.shape[0]
            return inner(x, t, cond)

        model.forward_velocity = forward_velocity


def classifiers(out: str):
    """The reward's classifier and a second one it never sees (trained here once, other seed and width)."""
    from tempflow.rewards.digits import load_classifier, save_classifier, train_classifier

    path = os.path.join(out, "second_classifier.safetensors")
    if not os.path.exists(path):
        model, acc = train_classifier(seed=7, width=48, epochs=30, log=lambda *_: None)
        save_classifier(model, path, seed=7, epochs=30, held_out_accuracy=acc)
    return load_classifier(), load_classifier(path)


@torch.no_grad()
def evaluate(model, clfs, per_digit: int, steps: int = 10, kl: bool = True) -> dict:
    """Held-out metrics of the current policy (deterministic ODE from noise no run trains on)."""
    from tempflow import rng, sde
    from tempflow.models.digits import prompt_for

    digits = torch.arange(10).repeat_interleave(per_digit)
    prompts = [prompt_for(int(d)) for d in digits]
    grid = model.time_grid(steps)
    table = sde.sde_table(grid, "flow-grpo", 0.7)
    cond = model.encode(prompts)
    index = torch.arange(len(prompts))
    x = rng.normal(EVAL_SEED, torch.stack([index, torch.full_like(index, -1)], 1), model.latent_shape)
    kls = []
    for k in range(steps):
        v = model.velocity(x, grid.sigmas[k], cond, index, model.default_guidance)
        if kl and k < steps - 1 and getattr(model, "lora", False):
            with model.reference():
                v_ref = model.velocity(x, grid.sigmas[k], cond, index, model.default_guidance)
            kls.append(sde.kl_from_velocity(v, v_ref, k, table).mean().item())
        x = sde.ode_step(x, v, k, grid)
    images = model.decode(x)
    probs = torch.softmax(clfs[0](images), 1)
    flat = images.flatten(1)
    spread = []
    for d in range(10):
        group = flat[digits == d]
        spread.append(torch.pdist(group).mean().item() if len(group) > 1 else 0.0)
    return {
        "agreement": (probs.argmax(1) == digits).float().mean().item(),
        "reward": probs[torch.arange(len(digits)), digits].mean().item(),
        "agreement_second_classifier": (clfs[1](images).argmax(1) == digits).float().mean().item(),
        "diversity": sum(spread) / 10,
        "kl": sum(kls) / len(kls) if kls else 0.0,
    }


def calls_per_tempflow_iteration(cfg) -> int:
    """Sampling calls of one TempFlow iteration (per seed T-1 main + K * the completions' calls) + training."""
    N, P = cfg.seeds_per_prompt, cfg.prompts_per_iteration
    sampling = cfg.plan().model_calls_per_seed()  # main path, the completions of the branches
    cfg_pair = 2 if cfg.guidance != 1 else 1
    return P * N * (sampling + len(cfg.trained_steps())) * cfg_pair  # + one training forward per (seed, step) state


def run(job: dict) -> list[dict]:
    """One training run to the budget; returns its evaluation records."""
    torch.set_num_threads(1)
    from tempflow.models.digits import DigitsModel
    from tempflow.rewards import DigitCorrectness
    from tempflow.train.trainer import TrainConfig, train

    name, seed, budget, out, per_digit = job["name"], job["seed"], job["budget"], job["out"], job["per_digit"]
    folder = os.path.join(out, "runs", f"{name.replace(' ', '_').replace('(', '').replace(')', '')}_s{seed}")
    cfg = TrainConfig(**VARIANTS[name], seed=seed, iterations=10_000, checkpoint_every=10_000, out=folder)
    model = DigitsModel.load()
    counter = Counted(model)
    clfs = classifiers(out)
    reward = DigitCorrectness()
    timing = {"reward_s": 0.0}

    def timed_reward(images, prompts, metadata):
        t0 = time.perf_counter()
        try:
            return reward(images, prompts, metadata)
        finally:
            timing["reward_s"] += time.perf_counter() - t0

    timed_reward.name = reward.name
    records = [dict(job["base"], diversity=1.0, name=name, seed=seed, fraction=0.0, calls=0, seconds=0.0, iteration=0)]
    split = {"sampling_s": 0.0, "reward_s": 0.0, "training_s": 0.0}
    marks = list(FRACTIONS)

    def after_iteration(m, last):
        """The trainer's callback: time split, evaluations at the budget's marks; True (stop) once it is spent."""
        iteration = last["iteration"]
        split["reward_s"] += timing["reward_s"]
        split["sampling_s"] += last["rollout_s"] - timing["reward_s"]
        split["training_s"] += last["train_s"]
        timing["reward_s"] = 0.0
        while marks and counter.calls >= marks[0] * budget:
            counter.paused = True
            rec = evaluate(m, clfs, per_digit)
            if len(marks) == 1:
                rec["agreement_T40"] = evaluate(m, clfs, per_digit, steps=40, kl=False)["agreement"]
            counter.paused = False
            rec["diversity"] /= job["base"]["diversity"]
            per_it = {k: v / iteration for k, v in split.items()}
            records.append(
                dict(
                    rec,
                    name=name,
                    seed=seed,
                    fraction=marks.pop(0),
                    calls=counter.calls,
                    seconds=sum(split.values()),  # rollout + training
                    iteration=iteration,
                    **per_it,
                )
            )
        return not marks

    # the study's run folders are scratch: a rerun of the study replaces them
    train(model, "digits", timed_reward, cfg, overwrite=True, log=lambda *_: None, callback=after_iteration)
    return records


def speedups(reps: int = 3, **settings) -> dict:
    """One TempFlow iteration's rollout with the engine vs the naive official-style loop, and its training with
    dedup (one forward per state, K actions in the fused loss) vs one forward per (state, action) row."""
    torch.set_num_threads(1)
    from harness import compare

    from tempflow import ops, sde
    from tempflow.models.digits import DigitsModel
    from tempflow.prompts import digits_prompts
    from tempflow.rewards import DigitCorrectness
    from tempflow.rollout import naive_rollout, rollout
    from tempflow.train.advantages import tempflow_advantages
    from tempflow.train.trainer import TrainConfig

    cfg = TrainConfig(**settings)
    model = DigitsModel.load()
    model.use_lora(cfg.lora_rank, cfg.lora_alpha)
    plan, rcfg = cfg.plan(), cfg.rollout_config()
    prompts, _, ids = digits_prompts().draw(0, cfg.prompts_per_iteration, cfg.seed)
    reward = DigitCorrectness()
    with torch.no_grad():
        batch = rollout(model, prompts, reward, rcfg, prompt_ids=ids)
    adv = tempflow_advantages(batch, "seed")
    table = sde.sde_table(model.time_grid(cfg.steps), "flow-grpo", cfg.noise_level)
    weights = sde.noise_aware_weights(table, plan.sde_steps)
    cond = model.encode(batch.prompts)
    K = plan.K
    rows = torch.arange(len(batch)).view(-1, K)
    first = rows[:, 0]

    def train_pass(dedup: bool):
        for lo in range(0, len(first), cfg.states_per_step):
            r, s = rows[lo : lo + cfg.states_per_step], first[lo : lo + cfg.states_per_step]
            if dedup:
                x, step, pi = batch.state[s], batch.step[s], batch.prompt_index[s]
                v = model.velocity(x, table.t[step], cond, pi, cfg.guidance)
                loss = ops.branch_grpo_loss(
                    v, x, batch.action[r], step, table, batch.old_log_prob[r], adv[r], weights[step], cfg.clip_eps
                )
            else:
                flat = r.flatten()
                x, step, pi = batch.state[flat], batch.step[flat], batch.prompt_index[flat]
                v = model.velocity(x, table.t[step], cond, pi, cfg.guidance)
                loss = ops.branch_grpo_loss(
                    v,
                    x,
                    batch.action[flat, None],
                    step,
                    table,
                    batch.old_log_prob[flat, None],
                    adv[flat, None],
                    weights[step],
                    cfg.clip_eps,
                )
            loss.backward()

    def roll(fn):
        with torch.no_grad():
            fn(model, prompts, reward, rcfg, prompt_ids=ids)

    r = compare(
        {
            "engine": lambda: roll(rollout),
            "naive": lambda: roll(naive_rollout),
            "dedup": lambda: train_pass(True),
            "repeated": lambda: train_pass(False),
        },
        warmup=1,
        reps=reps,
    )
    med = {k: v["median_s"] for k, v in r.items()}
    return {
        "setting": f"{cfg.seeds_per_prompt}x{K}, T={cfg.steps}, {cfg.prompts_per_iteration} prompts",
        "rollout_engine_s": med["engine"],
        "rollout_naive_s": med["naive"],
        "rollout_speedup": med["naive"] / med["engine"],
        "train_dedup_s": med["dedup"],
        "train_repeated_s": med["repeated"],
        "train_speedup": med["repeated"] / med["dedup"],
        "iteration_speedup": (med["naive"] + med["repeated"]) / (med["engine"] + med["dedup"]),
    }


# ---------------------------------------------------------------------------------------------------------------
# summary


def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.pstdev(values) if len(values) > 1 else 0.0)


def curves(records, names, x: str, y: str):
    out = {}
    for name in names:
        rows = [r for r in records if r["name"] == name]
        if not rows:
            continue
        fracs = sorted({r["fraction"] for r in rows})
        xs, ms, ss = [], [], []
        for f in fracs:
            at = [r for r in rows if r["fraction"] == f]
            xs.append(statistics.fmean(r[x] for r in at))
            m, s = _mean_std([r[y] for r in at])
            ms.append(m)
            ss.append(s)
        out[name] = (xs, ms, ss)
    return out


def at_seconds(records, name: str, limit: float, key: str):
    """Per seed: ``key`` of ``name`` at ``limit`` training seconds, interpolated linearly between the evaluations
    around it (the last one if the run ended sooner)."""
    values = []
    for seed in sorted({r["seed"] for r in records if r["name"] == name}):
        rows = sorted((r for r in records if r["name"] == name and r["seed"] == seed), key=lambda r: r["seconds"])
        before = [r for r in rows if r["seconds"] <= limit]
        after = [r for r in rows if r["seconds"] > limit]
        a = before[-1]
        if not after:
            values.append(a[key])
            continue
        b = after[0]
        w = (limit - a["seconds"]) / (b["seconds"] - a["seconds"])
        values.append(a[key] + w * (b[key] - a[key]))
    return _mean_std(values)


def fmt(ms):
    m, s = ms
    return "n/a" if math.isnan(m) else f"{m:.3f} ± {s:.3f}"


def summarize(records, speed, out_png: str, note: str) -> str:
    from tempflow.train.plots import band_chart

    os.makedirs(out_png, exist_ok=True)
    for group, names in GROUPS.items():
        for x, label in (
            ("iteration", "training iterations"),
            ("seconds", "wall-clock seconds (rollout + training)"),
            ("calls", "model calls (samples through the transformer)"),
        ):
            c = curves(records, names, x, "reward")
            if c:
                band_chart(
                    c,
                    os.path.join(out_png, f"study_{group}_reward_vs_{x}.png"),
                    f"{group}: held-out reward (mean +- std over seeds)",
                    label,
                )
    c = curves(records, GROUPS["main"], "seconds", "diversity")
    if c:
        band_chart(
            c,
            os.path.join(out_png, "study_main_diversity_vs_seconds.png"),
            "reward-hacking monitor: sample diversity within a prompt (base = 1)",
            "wall-clock seconds",
        )
    finals = [r for r in records if r["fraction"] == 1.0]
    names = [n for n in VARIANTS if any(r["name"] == n for r in finals)]
    main_names = [n for n in GROUPS["main"] if n in names]
    limit = min(max(r["seconds"] for r in finals if r["name"] == n) for n in main_names) if main_names else 0
    lines = [
        note,
        "",
        f"| run | seeds | agreement T=10 | agreement T=40 | second classifier | diversity | KL | agreement at "
        f"{limit:.0f} s | iterations | s / iteration: sampling, reward, training |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in names:
        rows = [r for r in finals if r["name"] == n]
        split = ", ".join(
            f"{statistics.fmean(r[k] for r in rows):.2f}" for k in ("sampling_s", "reward_s", "training_s")
        )
        lines.append(
            f"| {n} | {len(rows)} | {fmt(_mean_std([r['agreement'] for r in rows]))} | "
            f"{fmt(_mean_std([r.get('agreement_T40') for r in rows]))} | "
            f"{fmt(_mean_std([r['agreement_second_classifier'] for r in rows]))} | "
            f"{fmt(_mean_std([r['diversity'] for r in rows]))} | {fmt(_mean_std([r['kl'] for r in rows]))} | "
            f"{fmt(at_seconds(records, n, limit, 'agreement'))} | "
            f"{statistics.fmean(r['iteration'] for r in rows):.0f} | {split} |"
        )
    base = [r for r in records if r["fraction"] == 0.0][:1]
    if base:
        lines.append(
            f"| base model | - | {base[0]['agreement']:.3f} | {base[0]['agreement_T40']:.3f} | "
            f"{base[0]['agreement_second_classifier']:.3f} | 1 | 0 | - | 0 | - |"
        )
    lines += completion_table(records, finals)
    if speed:
        lines += [
            "",
            f"One TempFlow iteration ({speed['setting']}, one thread): rollout engine "
            f"{speed['rollout_engine_s']:.2f} s vs naive official-style loop {speed['rollout_naive_s']:.2f} s "
            f"({speed['rollout_speedup']:.2f}x); training with dedup {speed['train_dedup_s']:.2f} s vs one forward "
            f"per action {speed['train_repeated_s']:.2f} s ({speed['train_speedup']:.2f}x); whole iteration "
            f"{speed['iteration_speedup']:.2f}x.",
        ]
    return "\n".join(lines)


def completion_table(records, finals) -> list[str]:
    """The cheap completions against exact TempFlow and Flow-GRPO: held-out agreement at the budget and at the
    seconds every run of the group reached, and an iteration's seconds against a Flow-GRPO iteration."""
    names = [n for n in GROUPS["completion"] if any(r["name"] == n for r in finals)]
    if not any(VARIANTS[n].get("completion") for n in names):
        return []
    limit = min(max(r["seconds"] for r in finals if r["name"] == n) for n in names)

    def per_iteration(n):
        rows = [r for r in finals if r["name"] == n]
        return statistics.fmean(sum(r[k] for k in ("sampling_s", "reward_s", "training_s")) for r in rows)

    flow = per_iteration("flow-grpo (global std)") if "flow-grpo (global std)" in names else float("nan")
    lines = ["", f"Cheaper completions (issue 15): held-out agreement (T=10) at the budget and at {limit:.0f} s, "
             "and one iteration's seconds (sampling + reward + training) against a Flow-GRPO iteration of the same "
             "group size (24).", "",
             f"| run | completion | agreement at budget | agreement at {limit:.0f} s | iterations | s / iteration | "
             "x Flow-GRPO iteration |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for n in names:
        rows = [r for r in finals if r["name"] == n]
        it = per_iteration(n)
        lines.append(
            f"| {n} | {completion_label(VARIANTS[n])} | {fmt(_mean_std([r['agreement'] for r in rows]))} | "
            f"{fmt(at_seconds(records, n, limit, 'agreement'))} | "
            f"{statistics.fmean(r['iteration'] for r in rows):.0f} | {it:.2f} | {it / flow:.2f} |"
        )
    return lines


def completion_label(variant: dict) -> str:
    label = variant.get("completion", "euler")
    if variant.get("skip_spread"):
        label += f", skip_spread {variant['skip_spread']:g}"
    return label


def write_summary(records, speed, out: str, note: str) -> str:
    table = summarize(records, speed, out, note)
    with open(os.path.join(out, "study_table.md"), "w") as fh:
        fh.write(table + "\n")
    print(table)
    return table


def resummarize(out: str) -> int:
    """Redraw from study.jsonl: every block run at the last block's budget, the latest record of each (run, seed,
    evaluation point) winning, so ``--variants`` can add runs to a study."""
    blocks, current = [], None
    for line in open(os.path.join(out, "study.jsonl")):
        r = json.loads(line)
        if "header" in r:
            current = (r, [])
            blocks.append(current)
        elif current is not None:
            current[1].append(r)
    last = blocks[-1][0]
    same = [
        (h, recs)
        for h, recs in blocks
        if (h["budget_calls"], h.get("per_digit")) == (last["budget_calls"], last.get("per_digit"))
    ]
    merged = {}
    for _, recs in same:
        for r in recs:
            merged[(r["name"], r["seed"], r["fraction"])] = r
    records = list(merged.values())
    seeds = len({r["seed"] for r in records})
    note = (
        f"{seeds} seed(s) per run; budget {last['budget_calls']} model calls (= {last['budget_iterations']:g} "
        f"TempFlow iterations); held-out {10 * last['per_digit']} samples per evaluation; study wall time "
        f"{sum(h['total_s'] for h, _ in same) / 60:.1f} min ({len(same)} invocation(s))."
    )
    write_summary(records, last["speedups"], out, note)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the main runs, one seed, a tiny budget (CI)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--budget", type=float, default=24, help="model calls of this many TempFlow iterations")
    ap.add_argument("--per-digit", type=int, default=15, help="held-out samples per digit at each evaluation")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--variants", default="all", help="names separated by commas, or all")
    ap.add_argument("--out", default=RESULTS, help="folder for study.jsonl, study_*.png, study_table.md")
    ap.add_argument("--summarize", action="store_true", help="redraw the table and plots from study.jsonl's last run")
    args = ap.parse_args(argv)
    if args.summarize:
        return resummarize(args.out)
    names = list(VARIANTS) if args.variants == "all" else [n.strip() for n in args.variants.split(",")]
    if args.quick:
        args.seeds, args.budget, args.per_digit, names = 1, 0.5, 2, GROUPS["main"]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    from tempflow.models.digits import DigitsModel
    from tempflow.train.trainer import TrainConfig

    os.makedirs(args.out, exist_ok=True)
    scratch = os.path.join(args.out, "study_runs") if args.quick else os.path.join("runs", "study")
    os.makedirs(scratch, exist_ok=True)
    start = time.perf_counter()
    torch.set_num_threads(1)
    clfs = classifiers(scratch)
    base_model = DigitsModel.load()
    base = evaluate(base_model, clfs, args.per_digit, kl=False)
    base["agreement_T40"] = evaluate(base_model, clfs, args.per_digit, steps=40, kl=False)["agreement"]
    budget = int(args.budget * calls_per_tempflow_iteration(TrainConfig()))
    jobs = [
        dict(name=n, seed=s, budget=budget, out=scratch, per_digit=args.per_digit, base=base)
        for s in range(args.seeds)
        for n in names
    ]
    records = []
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for recs in pool.map(run, jobs):
            records += recs
            last = recs[-1]
            print(
                f"{last['name']} seed {last['seed']}: agreement {last['agreement']:.3f} after {last['iteration']} "
                f"iterations, {last['seconds']:.0f} s, {last['calls']} calls",
                flush=True,
            )
    small = dict(seeds_per_prompt=2, branches=2, prompts_per_iteration=1, steps=4)
    speed = speedups(reps=1, **small) if args.quick else speedups(reps=3, states_per_step=36)
    total = time.perf_counter() - start
    with open(os.path.join(args.out, "study.jsonl"), "a") as fh:
        fh.write(
            json.dumps(
                {
                    "header": header(),
                    "argv": sys.argv[1:],
                    "budget_calls": budget,
                    "budget_iterations": args.budget,
                    "per_digit": args.per_digit,
                    "total_s": total,
                    "speedups": speed,
                }
            )
            + "\n"
        )
        for r in records:
            fh.write(json.dumps(r) + "\n")
    note = (
        f"{args.seeds} seed(s) per run; budget {budget} model calls (= {args.budget:g} TempFlow iterations); "
        f"held-out {10 * args.per_digit} samples per evaluation; study wall time {total / 60:.1f} min."
    )
    write_summary(records, speed, args.out, note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
