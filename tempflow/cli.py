"""``tempflow`` command line.

tempflow demo     sample an analytic Gaussian-mixture flow with the ODE and each SDE schedule, and check that
                  every sampler lands on the data distribution (the main job until the trainer lands)
tempflow doctor   what is installed and built, which backends serve which device, and why one is missing
"""

from __future__ import annotations

import argparse
import importlib.metadata
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
    if args.what == "classifier":
        from .rewards import digits

        start = time.perf_counter()
        model, acc = digits.train_classifier(seed=args.seed, epochs=args.epochs or 40)
        out = args.out or digits.CLASSIFIER_WEIGHTS
        digits.save_classifier(
            model,
            out,
            seed=args.seed,
            epochs=args.epochs or 40,
            held_out_accuracy=round(acc, 4),
            torch=torch.__version__,
        )
        print(f"held-out accuracy {acc:.4f}; wrote {out} in {time.perf_counter() - start:.0f} s")
        return 0
    raise ValueError(f"unknown pretraining target {args.what!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tempflow", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"tempflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="sample an analytic flow with the ODE and every SDE schedule")
    demo.add_argument("--steps", type=int, default=10, help="number of sampling steps T (default 10)")
    demo.add_argument("--samples", type=int, default=20000, help="number of samples (default 20000)")
    demo.add_argument("--shift", type=float, default=3.0, help="static time shift of the grid (SD3: 3)")
    demo.add_argument("--noise-level", type=float, default=0.7, help="SDE noise level a (default 0.7)")
    demo.add_argument("--modes", type=int, default=4, help="number of mixture components (default 4)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the counter-based noise (default 0)")
    demo.set_defaults(func=cmd_demo)

    pre = sub.add_parser("pretrain", help="rebuild a shipped model of the embedded default (reproducible)")
    pre.add_argument("what", choices=["classifier"], help="classifier: the digit classifier of the digit reward")
    pre.add_argument("--seed", type=int, default=0, help="training seed (default 0, the shipped weights)")
    pre.add_argument("--epochs", type=int, default=None, help="epochs (default: the shipped recipe's)")
    pre.add_argument("--out", default=None, help="output file (default: the package's asset)")
    pre.set_defaults(func=cmd_pretrain)

    doctor = sub.add_parser("doctor", help="report installed parts, built extensions and backends")
    doctor.set_defaults(func=cmd_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "samples", 1) < 1 or getattr(args, "steps", 1) < 1:
        print("tempflow: --samples and --steps must be positive", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (ValueError, TypeError) as exc:
        print(f"tempflow {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
