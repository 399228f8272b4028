"""torch.compile of the denoiser's forward (``compile`` setting): per-forward speed, compile time, and whole runs.

    python bench/bench_compile.py forward [--model digits|sd3-30m] [--rows 16 32 64 128]
    python bench/bench_compile.py train [--rounds 2] [--variants eager true-cold true-warm] [--set name=value ...]
    python bench/bench_compile.py train --model sd3-30m --iterations 8     # the 30.9M SD3-architecture transformer
    python bench/bench_compile.py guidance-step                            # what a fused CFG + ODE step could save

``forward``: one guided forward (the adapter's ``forward_velocity``, LoRA r16 attached as in training) eager,
compiled with a dynamic batch dimension (``compile=true``: one graph) and compiled per shape (``compile=static``),
timed interleaved in one process at each batch size (rows, a CFG pair counting two); the first call of each compiled
variant is its compile time (a fresh inductor cache unless ``--warm``).

``train``: whole ``tempflow train`` runs, each in a fresh process (``python -m tempflow.cli train`` with the
defaults unless ``--set``), the variants interleaved in time and repeated ``--rounds`` times so that the machine's
load hits all of them alike: ``eager``; ``true-cold`` (compile=true, a fresh empty ``TORCHINDUCTOR_CACHE_DIR``);
``true-warm`` (compile=true again on the cache the cold run of the same round filled: what a second run on the same
machine pays); ``static-cold`` / ``static-warm`` (compile=static). Each run reports its wall time (process start to
exit, imports and model load included), the trainer's own phases from metrics.jsonl, the graphs dynamo compiled and
the recompilations (``TORCH_LOGS=recompiles`` lines), and the load average before and after.
``--model sd3-30m``: the same trainer (``tempflow.train.train``, LoRA r16, digit reward, held-out evaluation) on a
30.9M-parameter SD3Transformer2DModel with random weights (6 joint blocks, 6 heads of 64, text width 256) on the
digits task's 16x16 pixels; a smaller recipe (``--iterations``, 2 prompts x 2 seeds x K=3, T=6, evaluation of
50 samples at 10 steps) because one eager iteration of the default recipe takes about a minute on 2 cores.

``guidance-step``: on the live-item counts of a default rollout tick, the classifier-free guidance combination and
the ODE step as the engine runs them (inside the adapter, then ``sde.ode_step``) against the whole tick's forward:
the most that fusing the two (the removed ``ops.cfg_ode_step``) could save.

Results are appended to bench/results/bench_compile.jsonl.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SD3_30M = dict(num_layers=6, attention_head_dim=64, num_attention_heads=6, text_dim=256)
# the 30M model's recipe: the default's shape, scaled down (see the module docstring)
SD3_30M_RECIPE = dict(steps=6, branches=3, seeds_per_prompt=2, prompts_per_iteration=2, eval_steps=10,
                      eval_per_prompt=5, states_per_step=6)  # fmt: skip


def load() -> list[float]:
    return [float(v) for v in open("/proc/loadavg").read().split()[:3]]


def build_model(name: str, seed: int = 0):
    from tempflow.models import digits as dg

    if name == "digits":
        return dg.DigitsModel.load()
    torch.manual_seed(seed)
    model = dg.DigitsModel(dg.DigitsConfig(**SD3_30M))
    model.net.eval()
    return model


def params_m(model) -> float:
    return sum(p.numel() for p in model.trained_module().parameters()) / 1e6


# --------------------------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------------------------


def bench_forward(args) -> dict:
    from tempflow.models import digits as dg
    from tempflow.rollout import compile_model, compile_stats

    torch.set_grad_enabled(False)
    cache = None
    if not args.warm:
        cache = tempfile.mkdtemp(prefix="tempflow-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    base = build_model(args.model)
    torch.manual_seed(1)
    base.use_lora(16, 32)  # as in training: the LoRA layers are part of every forward
    for p in base.trainable_parameters():  # nonzero adapters, as after a few updates
        p.data.normal_(0, 0.01)
    variants = {"eager": base}
    for kind in args.kinds:
        model = copy.deepcopy(base)
        compile_model(model, True if kind == "true" else kind, max(args.rows))
        variants[kind] = model
    cond = base.encode([dg.prompt_for(i) for i in range(10)])

    def inputs(rows):
        g = torch.Generator().manual_seed(rows)
        c = cond.select(torch.arange(rows) % 10)
        return torch.randn(rows, *base.latent_shape, generator=g), torch.rand(rows, generator=g), c

    first = {}
    for kind in args.kinds:
        for rows in args.rows:
            start = time.perf_counter()
            variants[kind].forward_velocity(*inputs(rows))
            first[f"{kind} {rows}"] = time.perf_counter() - start
            print(f"{kind}: first call at {rows} rows {first[f'{kind} {rows}']:.1f} s (load {load()})", flush=True)
    out = []
    for rows in args.rows:
        a = inputs(rows)
        fns = {k: (lambda m=m, a=a: m.forward_velocity(*a)) for k, m in variants.items()}
        before = load()
        timing = harness.compare(fns, warmup=2, reps=args.reps)
        ref = fns["eager"]()
        row = {"rows": rows, "load_before": before, "load_after": load()}
        for k, s in timing.items():
            row[f"{k}_ms"] = s["median_s"] * 1e3
            if k != "eager":
                row[f"{k}_x_eager"] = timing["eager"]["median_s"] / s["median_s"]
                row[f"{k}_max_abs_diff"] = float((fns[k]() - ref).abs().max())
        out.append(row)
        print(json.dumps(row), flush=True)
    stats = {k: compile_stats(m) for k, m in variants.items() if k != "eager"}
    if cache:
        shutil.rmtree(cache, ignore_errors=True)
    return {"bench": "forward", "model": args.model, "params_M": params_m(base), "lora_rank": 16,
            "cache": "warm" if args.warm else "cold", "first_call_s": first, "rows": out,
            "compile_stats": stats}  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# train: whole runs in fresh processes
# --------------------------------------------------------------------------------------------------------------

CHILD = r"""
import json, sys, time
start = time.perf_counter()
model_name, out, sets = sys.argv[1], sys.argv[2], sys.argv[3:]
if model_name == "digits":
    from tempflow import cli
    rc = cli.main(["train", "--overwrite", *sum((["--set", s] for s in sets), []), "--set", f"out={out}"])
else:
    import bench_compile as bc  # the working directory is bench/
    from tempflow.train import TrainConfig, train
    cfg = TrainConfig.from_sources(None, [*sets, f"out={out}"], base=bc.SD3_30M_RECIPE)
    model = bc.build_model(model_name)
    train(model, "digits", "digit-correctness", cfg, eval_prompts="digits", overwrite=True)
    rc = 0
from tempflow.rollout import compile_stats
print("BENCH_RESULT " + json.dumps({"rc": rc, "inner_s": time.perf_counter() - start, **compile_stats()}))
"""


def run_train(model: str, variant: str, sets: list[str], out: str, cache: str, log_dir: str) -> dict:
    kind = "false" if variant == "eager" else variant.split("-")[0]
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TORCH_LOGS": "recompiles", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-c", CHILD, model, out, *sets, f"compile={kind}"]
    before = load()
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=os.path.dirname(os.path.abspath(__file__)), env=env, capture_output=True,
                          text=True)  # fmt: skip
    wall = time.perf_counter() - start
    with open(os.path.join(log_dir, f"{variant}.{int(time.time())}.log"), "w") as fh:
        fh.write(proc.stdout + "\n----- stderr -----\n" + proc.stderr)
    if proc.returncode:
        raise RuntimeError(f"{variant} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.split("BENCH_RESULT ", 1)[1].splitlines()[0])
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    summary = json.load(open(os.path.join(out, "summary.json")))
    iters = [m for m in metrics if "rollout_s" in m]
    evals = [m["eval_s"] for m in metrics if "eval_s" in m]
    return {
        "variant": variant,
        "wall_s": wall,
        "train_s": summary["seconds"],
        "rollout_s": sum(m["rollout_s"] for m in iters),
        "first_rollout_s": iters[0]["rollout_s"],
        "rollout_s_median": statistics.median(m["rollout_s"] for m in iters),
        "train_update_s": sum(m["train_s"] for m in iters),
        "eval_s": evals,
        "iterations": len(iters),
        "graphs": result["graphs"],
        "recompiles": proc.stderr.count("Recompiling function"),
        "final_eval": summary["final"],
        "base_eval": summary["base"],
        "load_before": before,
        "load_after": load(),
    }


def bench_train(args) -> dict:
    sets = list(args.set or [])
    if args.model != "digits" and args.iterations:
        sets.append(f"iterations={args.iterations}")
    work = tempfile.mkdtemp(prefix="tempflow-bench-compile-")
    log_dir = os.path.join(work, "logs")
    os.makedirs(log_dir)
    runs = []
    try:
        for rnd in range(args.rounds):
            caches = {}
            for variant in args.variants:
                kind, _, temp = variant.partition("-")
                if temp == "warm" and kind not in caches:
                    raise SystemExit(f"{variant} needs {kind}-cold before it in --variants")
                if temp == "cold" or variant == "eager":
                    caches[kind] = tempfile.mkdtemp(prefix=f"inductor-{kind}-", dir=work)
                out = os.path.join(work, f"run-{variant}")
                row = run_train(args.model, variant, sets, out, caches[kind], log_dir)
                row["round"] = rnd
                runs.append(row)
                print(json.dumps(row), flush=True)
    finally:
        print(f"logs in {log_dir}")
    ratios = {}
    for rnd in range(args.rounds):
        eager = [r["wall_s"] for r in runs if r["round"] == rnd and r["variant"] == "eager"]
        for r in runs:
            if r["round"] == rnd and eager and r["variant"] != "eager":
                ratios.setdefault(r["variant"], []).append(eager[0] / r["wall_s"])
    print("eager wall / variant wall, per round:", {k: [round(v, 3) for v in vs] for k, vs in ratios.items()})
    return {"bench": "train", "model": args.model, "sets": sets, "runs": runs, "x_eager_per_round": ratios}


# --------------------------------------------------------------------------------------------------------------
# guidance-step: the fused CFG + ODE step's ceiling
# --------------------------------------------------------------------------------------------------------------


def bench_guidance_step(args) -> dict:
    from tempflow import sde
    from tempflow.models import digits as dg

    torch.set_grad_enabled(False)
    model = dg.DigitsModel.load()
    cond = model.encode([dg.prompt_for(3), dg.prompt_for(7)])
    grid = model.time_grid(10)
    rows = []

    def tail(x, v_u, v_c, step):  # what the engine runs after a forward: the CFG combination (adapter), ODE step
        return sde.ode_step(x, v_u + 2.0 * (v_c - v_u), step, grid)

    def tick(x, step, index):  # the tick's forwards at the default cap (64 rows: 32 guided samples per call)
        for lo in range(0, x.shape[0], 32):
            model.velocity(x[lo : lo + 32], grid.sigmas[step[lo : lo + 32]], cond, index[lo : lo + 32], 2.0)

    # live items per tick of the default iteration (2 prompts x 4 seeds, K=6 at steps 0..8, T=10)
    for n in (8, 56, 104, 200, 296, 392, 432):
        x = torch.randn(n, *model.latent_shape)
        v_u, v_c = torch.randn_like(x), torch.randn_like(x)
        step, index = torch.full((n,), 3), torch.arange(n) % 2
        fns = {"tail": functools.partial(tail, x, v_u, v_c, step), "tick": functools.partial(tick, x, step, index)}
        t = harness.compare(fns, warmup=1, reps=args.reps)
        row = {"items": n, "tail_us": t["tail"]["median_s"] * 1e6, "tick_ms": t["tick"]["median_s"] * 1e3,
               "tail_share": t["tail"]["median_s"] / t["tick"]["median_s"], "load": load()}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"bench": "guidance-step", "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["forward", "train", "guidance-step"])
    parser.add_argument("--model", default="digits", choices=["digits", "sd3-30m"])
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 32, 64, 128], help="forward: batch sizes (rows)")
    parser.add_argument("--kinds", nargs="+", default=["true", "static"], help="forward: compile kinds")
    parser.add_argument("--warm", action="store_true", help="forward: use the inductor cache as it is")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=1, help="train: repetitions of the interleaved variants")
    parser.add_argument("--variants", nargs="+", default=["eager", "true-cold", "true-warm"])
    parser.add_argument("--iterations", type=int, default=8, help="train --model sd3-30m: iterations")
    parser.add_argument("--set", action="append", help="train: a setting for every run (name=value)")
    parser.add_argument("--no-write", action="store_true", help="do not append to bench/results")
    args = parser.parse_args()
    record = {**harness.header(), "load_start": load()}
    if args.what == "forward":
        record.update(bench_forward(args))
    elif args.what == "train":
        record.update(bench_train(args))
    else:
        record.update(bench_guidance_step(args))
    record["load_end"] = load()
    if not args.no_write:
        print("wrote", harness.write("bench_compile", record))


if __name__ == "__main__":
    main()
