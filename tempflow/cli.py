"""``tempflow`` command line.

tempflow demo     sample an analytic Gaussian-mixture flow with the ODE and each SDE schedule, and check that
                  every sampler lands on the data distribution (the main job until the trainer lands)
tempflow doctor   what is installed and built, which backends serve which device, and why one is missing
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
import time

import torch

from . import __version__


def _dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cmd_doctor(args) -> int:
    from . import _ext, ops

    print(f"tempflow {__version__}  python {platform.python_version()}  {platform.platform()}")
    cuda = f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s)" if torch.version.cuda else "CPU build"
    print(f"torch {torch.__version__} ({cuda})")
    info = _ext.build_info()
    if info:
        print(f"built against torch {info.get('torch', '?')}")
    print("extensions:")
    for name in ("_C", "_C_cuda"):
        loaded, reason = _ext.load(name)
        print(f"  tempflow.{name:<8} {'loaded' if loaded else 'missing: ' + reason}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print("backends (TEMPFLOW_BACKEND overrides the automatic choice):")
    for dev in devices:
        status = ops.backend_status(dev)
        print(f"  {dev}: auto -> {ops.resolve_backend(dev, 'auto')}")
        for name, why in status.items():
            print(f"    {name:<7} {'ok' if not why else why}")
    print("optional packages:")
    for name in ("triton", "diffusers", "transformers", "peft", "deepspeed", "flash-attn", "xformers", "safetensors"):
        print(f"  {name:<13} {_dist_version(name)}")
    return 0


def cmd_demo(args) -> int:
    from . import rng, sde
    from .models import GaussianMixtureFlow

    torch.set_num_threads(max(1, torch.get_num_threads()))
    flow = GaussianMixtureFlow.ring(modes=args.modes, radius=2.0, std=0.3)
    grid = sde.time_grid(args.steps, shift=args.shift)
    n = args.samples
    print(
        f"tempflow demo: {n} samples of a {args.modes}-mode Gaussian mixture (exact velocity), "
        f"T={args.steps}, shift {args.shift}, noise level {args.noise_level}, seed {args.seed}"
    )
    print("grid t: " + " ".join(f"{t:.4f}" for t in grid.sigmas.tolist()))
    tables = {name: sde.sde_table(grid, name, args.noise_level) for name in sde.SCHEDULES}
    fg = tables["flow-grpo"]
    weights = sde.noise_aware_weights(fg)
    print("\nflow-grpo step table (weights w_k = std_k / mean std over the trained steps 0..T-2):")
    print("   k       t      dt   sigma_t     std   w_k")
    for k in range(args.steps):
        print(f"  {k:2d}  {fg.t[k]:.4f}  {fg.dt[k]:.4f}  {fg.sigma[k]:8.4f}  {fg.std[k]:.4f}  {weights[k]:.3f}")

    ids = torch.arange(n)

    def run(schedule: str | None, index: torch.Tensor):
        x = rng.normal(args.seed, torch.stack([index, torch.full_like(index, -1)], 1), (flow.dim,))
        logps = []
        for k in range(args.steps):
            v = flow.velocity(x, grid.sigmas[k].item())
            if schedule is None:
                x = sde.ode_step(x, v, k, grid)
            else:
                eps = rng.normal(args.seed, torch.stack([index, torch.full_like(index, k)], 1), (flow.dim,))
                out = sde.sde_step(x, v, k, tables[schedule], noise=eps)
                x = out.sample
                logps.append(out.log_prob.mean().item())
        return x, logps

    target = flow.sample(n, generator=torch.Generator().manual_seed(args.seed))
    rows = [("target (exact draws)", target, [], 0.0)]
    for schedule in (None, *sde.SCHEDULES):
        start = time.perf_counter()
        x, logps = run(schedule, ids)
        rows.append((schedule or "ode", x, logps, time.perf_counter() - start))

    print(
        f"\n{'sampler':<22}{'mode share min/max':>20}{'within-mode std':>17}{'overall std':>13}"
        f"{'mean logp/step':>16}{'seconds':>9}"
    )
    ok = True
    for name, x, logps, secs in rows:
        comp = flow.assign(x)
        share = torch.bincount(comp, minlength=args.modes).double() / n
        within = (x.double() - flow.means[comp]).std().item()
        overall = x.double().std(0).mean().item()
        lp = f"{sum(logps) / len(logps):.3f}" if logps else "-"
        print(f"{name:<22}{share.min():>10.3f} /{share.max():>6.3f}{within:>17.3f}{overall:>13.3f}{lp:>16}{secs:>9.2f}")
        ok &= bool((share - 1 / args.modes).abs().max() < 0.05)

    # Counter-based noise: the same sample indices drawn in another order and in chunks give the same samples.
    pick = torch.arange(min(n, 8))
    whole, _ = run("flow-grpo", pick)
    chunks = [run("flow-grpo", part)[0] for part in pick.flip(0).split(3)]
    again = torch.cat(chunks).flip(0)
    same = torch.equal(whole, again)
    print(
        f"\ncounter-based noise: samples 0..{len(pick) - 1} redrawn in reverse order, in chunks of 3: "
        f"{'identical' if same else 'DIFFERENT'}"
    )
    print("all samplers put every mode within 5 points of its weight: " + ("yes" if ok else "NO"))
    return 0 if (ok and same) else 1


def cmd_pretrain(args) -> int:
    start = time.perf_counter()
    if args.what == "classifier":
        from .rewards import digits

        epochs = args.steps or 40
        model, acc = digits.train_classifier(seed=args.seed, epochs=epochs)
        out = args.out or digits.CLASSIFIER_WEIGHTS
        digits.save_classifier(
            model, out, seed=args.seed, epochs=epochs, held_out_accuracy=round(acc, 4), torch=torch.__version__
        )
        print(f"held-out accuracy {acc:.4f}; wrote {out} in {time.perf_counter() - start:.0f} s")
        return 0
    from .models import digits as dg

    steps = args.steps or dg.PRETRAIN_STEPS
    model = dg.pretrain(steps=steps, seed=args.seed)
    seconds = time.perf_counter() - start
    quality = {
        f"agreement_T{t}_g{g}": round(dg.prompt_agreement(model, steps=t, guidance=g), 4)
        for t in (10, 40)
        for g in (1.0, model.default_guidance)
    }
    out = args.out or dg.WEIGHTS
    model.save(out, seed=args.seed, steps=steps, threads=2, seconds=round(seconds), torch=torch.__version__, **quality)
    print(
        f"wrote {out} after {seconds:.0f} s; prompt agreement: " + ", ".join(f"{k} {v:.3f}" for k, v in quality.items())
    )
    return 0


def cmd_sample(args) -> int:
    from .models import load_model, sample

    kwargs = {} if args.model == "digits" else {"height": args.size, "width": args.size, "torch_dtype": torch.float32}
    model = load_model(args.model, **kwargs)
    if args.run:
        from .train.trainer import load_run

        load_run(model, args.run, use_ema=args.ema)
    prompts = [p for p in args.prompts for _ in range(args.per_prompt)]
    guidance = model.default_guidance if args.guidance is None else args.guidance
    start = time.perf_counter()
    latents = sample(model, prompts, steps=args.steps, guidance=guidance, seed=args.seed, progress=True)
    images = model.decode(latents)
    from .train.plots import save_grid

    save_grid(images, args.per_prompt, args.out, scale=args.scale)
    seconds = time.perf_counter() - start
    print(f"{len(prompts)} samples (T={args.steps}, guidance {guidance}) in {seconds:.1f} s -> {args.out}")
    return 0


def cmd_train(args) -> int:
    from dataclasses import fields

    from .models import digits as dg
    from .rewards import DigitCorrectness
    from .train.trainer import TrainConfig, train

    if args.help_config:
        print("tempflow train settings (--set name=value):\n" + TrainConfig.help())
        return 0
    values = {}
    if args.config:
        import yaml

        with open(args.config) as fh:
            values.update(yaml.safe_load(fh) or {})
    types = {f.name: type(f.default) for f in fields(TrainConfig)}
    for item in args.set or []:
        name, _, raw = item.partition("=")
        if name not in types:
            raise ValueError(f"unknown setting {name!r}; see tempflow train --help-config")
        kind = types[name]
        values[name] = raw.lower() in ("1", "true", "yes", "on") if kind is bool else kind(raw)
    unknown = set(values) - set(types)
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)} in {args.config}; see tempflow train --help-config")
    cfg = TrainConfig(**values)
    cfg.validate()
    main_rank = int(os.environ.get("RANK", "0")) == 0
    say = print if main_rank else (lambda *_: None)
    say("tempflow train: " + ", ".join(f"{k}={v}" for k, v in sorted(vars(cfg).items())))
    model = dg.DigitsModel.load()
    start = time.perf_counter()
    base = dg.prompt_agreement(model, per_digit=args.eval_per_digit)
    say(f"held-out prompt agreement before: {base:.3f} (T=10, guidance {model.default_guidance})")
    train(model, DigitCorrectness(), cfg, resume=args.resume, log=say)
    after = dg.prompt_agreement(model, per_digit=args.eval_per_digit)  # every rank: ZeRO-3 forwards are collective
    seconds = time.perf_counter() - start
    say(f"held-out prompt agreement after: {after:.3f} ({after - base:+.3f}) in {seconds:.0f} s; run in {cfg.out}")
    if main_rank:
        with open(os.path.join(cfg.out, "summary.json"), "w") as fh:
            json.dump({"agreement_before": base, "agreement_after": after, "seconds": seconds}, fh, indent=2)
    return 0


def cmd_eval(args) -> int:
    from .models import digits as dg

    model = dg.DigitsModel.load()
    label = "base model"
    if args.run:
        from .train.trainer import load_run

        load_run(model, args.run, use_ema=not args.no_ema)
        label = f"{args.run} ({'final' if args.no_ema else 'EMA'} weights)"
    results = {}
    if min(args.eval_steps) < 1 or args.per_digit < 1:
        raise ValueError("--steps and --per-digit must be positive")
    for steps in args.eval_steps:
        acc = dg.prompt_agreement(model, steps=steps, guidance=args.guidance, per_digit=args.per_digit, seed=args.seed)
        results[f"agreement_T{steps}"] = acc
        print(f"{label}: held-out prompt agreement at T={steps}: {acc:.3f} ({10 * args.per_digit} samples)")
    if args.run:
        with open(os.path.join(args.run, "eval.json"), "w") as fh:
            json.dump({**results, "ema": not args.no_ema, "per_digit": args.per_digit}, fh, indent=2)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tempflow", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"tempflow {__version__}")
    # the deepspeed launcher passes --local_rank=N before the command (torchrun sets LOCAL_RANK instead)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="sample an analytic flow with the ODE and every SDE schedule")
    demo.add_argument("--steps", type=int, default=10, help="number of sampling steps T (default 10)")
    demo.add_argument("--samples", type=int, default=20000, help="number of samples (default 20000)")
    demo.add_argument("--shift", type=float, default=3.0, help="static time shift of the grid (SD3: 3)")
    demo.add_argument("--noise-level", type=float, default=0.7, help="SDE noise level a (default 0.7)")
    demo.add_argument("--modes", type=int, default=4, help="number of mixture components (default 4)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the counter-based noise (default 0)")
    demo.set_defaults(func=cmd_demo)

    pre = sub.add_parser("pretrain", help="rebuild a model shipped with the package (reproducible)")
    pre.add_argument("what", choices=["digits", "classifier"], help="digits: the embedded default flow model; "
                     "classifier: the digit classifier of the digit reward")  # fmt: skip
    pre.add_argument("--seed", type=int, default=0, help="training seed (default 0, the shipped weights)")
    pre.add_argument("--steps", type=int, default=None, help="optimizer steps (digits) or epochs (classifier); "
                     "default: the shipped recipe")  # fmt: skip
    pre.add_argument("--out", default=None, help="output file (default: the package's asset)")
    pre.set_defaults(func=cmd_pretrain)

    smp = sub.add_parser("sample", help="write a PNG grid of samples for a list of prompts")
    smp.add_argument("prompts", nargs="*", default=[f"a handwritten {d}" for d in range(10)],
                     help='prompts, one grid row each (default: "a handwritten 0" .. "a handwritten 9")')  # fmt: skip
    smp.add_argument("--per-prompt", type=int, default=8, help="samples per prompt (grid columns, default 8)")
    smp.add_argument("--steps", type=int, default=10, help="ODE steps (default 10)")
    smp.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (default: the model's)")
    smp.add_argument("--seed", type=int, default=0, help="seed of the counter-based initial noise")
    smp.add_argument("--scale", type=int, default=4, help="pixel upscaling of the PNG (default 4)")
    smp.add_argument("--out", default="samples.png", help="output PNG (default samples.png)")
    smp.add_argument("--model", default="digits", help="'digits' (the embedded default) or a local diffusers "
                     "SD3/SD3.5/FLUX pipeline folder")  # fmt: skip
    smp.add_argument("--size", type=int, default=512, help="image size for diffusers models (default 512)")
    smp.add_argument("--run", default=None, help="a tempflow train output folder: sample its trained weights")
    smp.add_argument("--ema", action="store_true", help="with --run: use the EMA weights")
    smp.set_defaults(func=cmd_sample)

    tr = sub.add_parser("train", help="TempFlow-GRPO (or Flow-GRPO) on the embedded default digits model")
    tr.add_argument("--config", default=None, help="YAML file of settings (see --help-config)")
    tr.add_argument("--set", action="append", metavar="NAME=VALUE", help="override one setting (repeatable)")
    tr.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    tr.add_argument("--eval-per-digit", type=int, default=50, help="samples per digit for the agreement measure")
    tr.add_argument("--help-config", action="store_true", help="list every setting with its help and exit")
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="held-out prompt agreement of the digits model or a run (deterministic ODE)")
    ev.add_argument("--run", default=None, help="a tempflow train output folder (default: the base model)")
    ev.add_argument("--no-ema", action="store_true", help="with --run: the final weights instead of the EMA")
    ev.add_argument(
        "--steps", dest="eval_steps", type=int, nargs="+", default=[10, 40], help="ODE steps (default 10 40)"
    )
    ev.add_argument("--guidance", type=float, default=None, help="guidance (default: the model's)")
    ev.add_argument("--per-digit", type=int, default=50, help="samples per digit (default 50)")
    ev.add_argument("--seed", type=int, default=1, help="noise seed of the evaluation samples")
    ev.set_defaults(func=cmd_eval)

    doctor = sub.add_parser("doctor", help="report installed parts, built extensions and backends")
    doctor.set_defaults(func=cmd_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    steps = getattr(args, "steps", None)
    if getattr(args, "samples", 1) < 1 or (steps is not None and steps < 1) or getattr(args, "per_prompt", 1) < 1:
        print("tempflow: --samples, --steps and --per-prompt must be positive", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, KeyError) as exc:
        print(f"tempflow {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
