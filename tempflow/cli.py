"""tempflow: reinforcement learning of flow-matching image models (TempFlow-GRPO and its Flow-GRPO baseline).

tempflow train         TempFlow-GRPO / Flow-GRPO: the embedded default with no arguments, or any model, prompts and
                       rewards from a YAML file (--config) and --set overrides
tempflow eval          held-out rewards of a run's base, final and EMA weights side by side
tempflow sample        a PNG grid of samples of a model or a run
tempflow serve-reward  serve a reward over HTTP (loopback by default) to trainers in other processes or machines
tempflow tiny-model    write a tiny random-weight SD3 / FLUX / Qwen-Image / Wan / Z-Image / FLUX.2 / CLIP folder
                       to try tempflow offline
tempflow pretrain      rebuild the embedded default's weights or its digit classifier
tempflow demo          sample an analytic Gaussian-mixture flow with the ODE and each SDE schedule and check them
tempflow doctor        what is installed and built, which backends serve which device, and why one is missing
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import shlex
import sys
import time

import numpy as np
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

    # one thread: the demo's ~9,600 small ops gain ~0.1 s from threads on an idle machine and lose up to ~45 s on a
    # busy one (each OpenMP region waits for a descheduled thread); the output is the same
    torch.set_num_threads(1)
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

        epochs, threads = args.steps or 40, 1  # the weights depend on the thread count (and the CPU's kernels)
        model, acc = digits.train_classifier(seed=args.seed, epochs=epochs, threads=threads)
        out = args.out or digits.CLASSIFIER_WEIGHTS
        digits.save_classifier(
            model,
            out,
            seed=args.seed,
            epochs=epochs,
            threads=threads,
            held_out_accuracy=round(acc, 4),
            torch=torch.__version__,
        )
        print(f"held-out accuracy {acc:.4f}; wrote {out} in {time.perf_counter() - start:.0f} s")
        return 0
    from .models import digits as dg

    steps, threads = args.steps or dg.PRETRAIN_STEPS, 2
    model = dg.pretrain(steps=steps, seed=args.seed, threads=threads)
    seconds = time.perf_counter() - start
    quality = {
        f"agreement_T{t}_g{g}": round(dg.prompt_agreement(model, steps=t, guidance=g), 4)
        for t in (10, 40)
        for g in (1.0, model.default_guidance)
    }
    out = args.out or dg.WEIGHTS
    model.save(
        out, seed=args.seed, steps=steps, threads=threads, seconds=round(seconds), torch=torch.__version__, **quality
    )
    print(
        f"wrote {out} after {seconds:.0f} s; prompt agreement: " + ", ".join(f"{k} {v:.3f}" for k, v in quality.items())
    )
    return 0


def _run_model(cfg, run: str | None):
    """The model a config names, loaded with its options; for a run, an error that says the folder moved."""
    from .models import load_model

    try:
        return load_model(cfg.model, **cfg.model_options())
    except FileNotFoundError as exc:
        if run and cfg.model != "digits":
            raise FileNotFoundError(f"run {run!r} was trained on model {cfg.model!r}, which is not there any more "
                                    f"({exc}); pass --model with its new path") from None  # fmt: skip
        raise


def _base_config(args, **flags):
    """A run's settings (its config.json) when ``--run`` is given, else the defaults; then --config, --set and the
    command's own flags (``flags``: setting -> value, None for not given), converted and checked alike."""
    from .train.trainer import TrainConfig, run_config

    base = run_config(args.run).to_dict() if args.run else {}
    sets = [*(args.set or []), *(f"{name}={value}" for name, value in flags.items() if value is not None)]
    return TrainConfig.from_sources(args.config, sets, base=base)


def cmd_sample(args) -> int:
    from .models import sample
    from .prompts import digits_prompts

    size = {"resolution": args.size, "height": 0, "width": 0} if args.size else {}
    cfg = _base_config(args, model=args.model, **size)
    model = _run_model(cfg, args.run)
    if args.run:
        from .train.trainer import load_run

        load_run(model, args.run, use_ema=args.ema)
    prompts = args.prompts or (digits_prompts().prompts if cfg.model == "digits" else None)
    if not prompts:
        raise ValueError('give prompts to sample: tempflow sample "a red fox" "a blue bird" ...')
    if any(not p.strip() for p in prompts):
        raise ValueError("an empty prompt: give each prompt some text (quote prompts that contain spaces)")
    prompts = [p for p in prompts for _ in range(args.per_prompt)]
    guidance = (cfg.guidance if args.run else model.default_guidance) if args.guidance is None else args.guidance
    start = time.perf_counter()
    latents = sample(model, prompts, steps=args.steps, guidance=guidance, seed=args.seed, batch=cfg.max_batch,
                     progress=True)  # fmt: skip
    images = model.decode(latents)
    from .train.plots import save_gif, save_grid

    save_grid(images, args.per_prompt, args.out, scale=args.scale)
    seconds = time.perf_counter() - start
    print(f"{len(prompts)} samples (T={args.steps}, guidance {guidance}) in {seconds:.1f} s -> {args.out}")
    if images.dim() == 5:  # videos (B, F, C, H, W): the grid shows filmstrips; each video also as an animated GIF
        stem = os.path.splitext(args.out)[0]
        for i, video in enumerate(images):
            save_gif(video, f"{stem}-{i:03d}.gif", fps=args.fps, scale=args.scale)
        print(f"{len(images)} videos ({images.shape[1]} frames, {args.fps:g} fps) -> {stem}-000.gif .. "
              f"{stem}-{len(images) - 1:03d}.gif")  # fmt: skip
    return 0


def _main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _say(*parts):
    if _main_rank():
        print(*parts, flush=True)


def cmd_train(args) -> int:
    from .prompts import load_prompts
    from .rewards.registry import build_reward
    from .train.runfolder import RunFolder
    from .train.trainer import Interrupted, TrainConfig, train

    if args.help_config:
        print("tempflow train settings (YAML --config file or --set name=value):\n" + TrainConfig.help())
        return 0
    cfg = TrainConfig.from_sources(args.config, args.set)
    _say("tempflow train: " + ", ".join(f"{k}={v}" for k, v in cfg.to_dict().items()))
    prompts = load_prompts(cfg.prompts)
    eval_prompts = load_prompts(cfg.eval_prompts) if cfg.eval_prompts else None
    held = f"{len(eval_prompts)} held-out prompts ({eval_prompts.name})" if eval_prompts else "no evaluation"
    _say(f"{len(prompts)} training prompts ({prompts.name}); {held}")
    with RunFolder(cfg.out, main=_main_rank()) as folder:  # locked and checked before rewards and model load
        if _main_rank():
            folder.open(cfg, args.resume or False, args.overwrite, log=_say)
        device = cfg.resolved_device()
        reward = build_reward(cfg.reward, device=device)
        eval_reward = build_reward(cfg.eval_reward, device=device) if cfg.eval_reward else None
        model = _run_model(cfg, None)
        start = time.perf_counter()
        try:
            train(model, prompts, reward, cfg, eval_prompts=eval_prompts, eval_reward=eval_reward,
                  resume=args.resume or False, overwrite=args.overwrite, log=_say, folder=folder)  # fmt: skip
        except Interrupted as stop:
            again = ["tempflow", "train", *(["--config", args.config] if args.config else [])]
            again += [a for item in args.set or [] for a in ("--set", item)] + ["--resume"]
            _say(f"{stop}; continue with: {shlex.join(again)}")
            return stop.exit_code
    if eval_prompts is not None and _main_rank():
        with open(os.path.join(cfg.out, "summary.json")) as fh:
            done = json.load(fh)
        for name, after in done["final"].items():
            before = done["base"].get(name, float("nan"))
            _say(f"held-out {name}: {before:.4f} at iteration {done['base_iteration']}, {after:.4f} at iteration "
                 f"{done['final_iteration']} ({after - before:+.4f})")  # fmt: skip
    _say(f"done in {time.perf_counter() - start:.0f} s; run in {cfg.out} (tempflow eval --run {cfg.out}; tempflow "
         f"sample --run {cfg.out})")  # fmt: skip
    return 0


def cmd_eval(args) -> int:
    """Base, final and EMA weights of a run (or a base model alone) side by side on held-out prompts."""
    from .prompts import load_prompts
    from .rewards.registry import build_reward
    from .train.evaluation import evaluate

    cfg = _base_config(args, model=args.model, eval_prompts=args.prompts, eval_reward=args.reward,
                       eval_per_prompt=args.per_prompt, eval_guidance=args.guidance, eval_seed=args.seed)  # fmt: skip
    prompts = load_prompts(cfg.eval_prompts or cfg.prompts)
    reward = build_reward(cfg.eval_reward or cfg.reward, device=cfg.resolved_device())
    model = _run_model(cfg, args.run)
    variants = {"base": None}
    if args.run:
        from .train.trainer import put_weights, run_checkpoint

        state = run_checkpoint(args.run)
        if cfg.lora_rank > 0:
            model.use_lora(cfg.lora_rank, cfg.lora_alpha)
        else:
            model.keep_reference_copy()
        variants = {"base": None, "final": state["params"]}
        if state["ema"] is not None:
            variants["ema"] = state["ema"]
    steps = args.eval_steps or [cfg.eval_steps]
    guidance = cfg.guidance if cfg.eval_guidance is None else cfg.eval_guidance
    results: dict[str, dict[str, dict[str, float]]] = {}
    n = len(prompts) * cfg.eval_per_prompt
    print(f"held-out: {len(prompts)} prompts ({prompts.name}) x {cfg.eval_per_prompt} = {n} samples, guidance "
          f"{guidance}, seed {cfg.eval_seed}")  # fmt: skip
    for t in steps:
        for name, weights in variants.items():
            if weights is not None:
                put_weights(model, weights, f"{args.run}/checkpoint.pt")
            with model.reference() if weights is None and args.run else contextlib.nullcontext():  # base: adapters off
                res = evaluate(model, prompts, reward, t, guidance, cfg.eval_per_prompt, cfg.eval_seed, cfg.max_batch)
            results.setdefault(f"T{t}", {})[name] = res.values
    names = list(variants)
    for t, by_variant in results.items():
        print(f"\n{'T=' + t[1:]:<30}" + "".join(f"{v:>12}" for v in names))
        for value in by_variant[names[0]]:
            print(f"  {value[:28]:<28}" + "".join(f"{by_variant[v][value]:>12.4f}" for v in names))
    if args.run:
        with open(os.path.join(args.run, "eval.json"), "w") as fh:
            json.dump({"samples": n, "prompts": prompts.name, "guidance": guidance, "seed": cfg.eval_seed,
                       "results": results}, fh, indent=2)  # fmt: skip
        print(f"\nwrote {os.path.join(args.run, 'eval.json')}")
    return 0


def cmd_serve_reward(args) -> int:
    from .rewards.remote import serve_main

    kwargs = {}
    for item in args.set or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: write key=value")
        import yaml

        kwargs[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return serve_main(args.reward, host=args.host, port=args.port, token=args.token, device=args.device, kwargs=kwargs,
                      allow_open=args.allow_open, verbose=not args.quiet)  # fmt: skip


def cmd_tiny_model(args) -> int:
    from .models.tiny import save_tiny

    save_tiny(args.kind, args.folder, seed=args.seed)
    print(f"wrote a tiny random-weight {args.kind} model to {args.folder}")
    return 0


def _resume_mode(value: str):
    if value != "auto":
        raise argparse.ArgumentTypeError(f"--resume takes no value or 'auto', not {value!r}")
    return "auto"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tempflow", description=__doc__.split("\n\n")[0],
                                     epilog="tempflow COMMAND --help: what a command does and its options")  # fmt: skip
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
    smp.add_argument("prompts", nargs="*", help='prompts, one grid row each (digits model: "a handwritten 0" .. "9")')
    smp.add_argument("--per-prompt", type=int, default=8, help="samples per prompt (grid columns, default 8)")
    smp.add_argument("--steps", type=int, default=10, help="ODE steps (default 10)")
    smp.add_argument("--guidance", type=float, default=None, help="guidance (default: the run's, else the model's)")
    smp.add_argument("--seed", type=int, default=0, help="seed of the counter-based initial noise")
    smp.add_argument("--scale", type=int, default=4, help="pixel upscaling of the PNG (default 4)")
    smp.add_argument(
        "--out",
        default="samples.png",
        help="output PNG (default samples.png); a video model also "
        "writes OUT-000.gif, OUT-001.gif, ... (one animated GIF per sample, OUT without .png)",
    )
    smp.add_argument("--fps", type=float, default=16, help="frames per second of video GIFs (default 16, Wan's)")
    smp.add_argument("--model", default=None, help="'digits' (default) or a local diffusers folder (SD3, FLUX, "
                     "Qwen-Image, Wan, Z-Image, FLUX.2); with --run: the run's model (give this if its folder "
                     "moved)")  # fmt: skip
    smp.add_argument("--size", type=int, default=None, help="image size (default: the run's, else the model's)")
    smp.add_argument("--run", default=None, help="a tempflow train output folder: sample its trained weights")
    smp.add_argument("--ema", action="store_true", help="with --run: use the EMA weights")
    smp.add_argument("--config", default=None, help=argparse.SUPPRESS)
    smp.add_argument("--set", action="append", metavar="NAME=VALUE", help="model setting, e.g. dtype=bf16")
    smp.set_defaults(func=cmd_sample)

    tr = sub.add_parser("train", help="TempFlow-GRPO (or Flow-GRPO): the embedded default, or your model, prompts "
                        "and rewards (--config / --set)")  # fmt: skip
    tr.add_argument("--config", default=None, help="YAML file of settings (see --help-config and configs/)")
    tr.add_argument("--set", action="append", metavar="NAME=VALUE", help="override one setting (repeatable)")
    tr.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        choices=[True, "auto"],
        type=_resume_mode,
        help="continue the run in the output folder from its checkpoint (settings that change the "
        "experiment are refused); --resume auto: continue if there is a checkpoint, else start fresh",
    )
    tr.add_argument("--overwrite", action="store_true", help="replace the run the output folder holds (its files only)")
    tr.add_argument("--help-config", action="store_true", help="list every setting with its help and exit")
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="held-out rewards of a run's base, final and EMA weights (or of a base model)")
    ev.add_argument("--run", default=None, help="a tempflow train output folder (its model, prompts and rewards)")
    ev.add_argument("--model", default=None, help="the model (default: the run's; give it if the run's folder moved)")
    ev.add_argument("--prompts", default=None, help="held-out prompts: digits, .txt or .jsonl (default: the run's)")
    ev.add_argument("--reward", default=None, help="reward name, import path or YAML mapping (default: the run's)")
    ev.add_argument("--steps", dest="eval_steps", type=int, nargs="+", default=None,
                    help="ODE steps, one evaluation each (default: the run's eval_steps, 40)")  # fmt: skip
    ev.add_argument("--guidance", type=float, default=None, help="guidance (default: the run's)")
    ev.add_argument("--per-prompt", type=int, default=None, help="samples per prompt (default: the run's)")
    ev.add_argument("--seed", type=int, default=None, help="noise seed of the samples (default: the run's eval_seed)")
    ev.add_argument("--config", default=None, help="YAML file of settings (instead of a run's)")
    ev.add_argument("--set", action="append", metavar="NAME=VALUE", help="override one setting (repeatable)")
    ev.set_defaults(func=cmd_eval)

    srv = sub.add_parser("serve-reward", help="serve a reward over HTTP to trainers elsewhere (loopback by default)")
    srv.add_argument("reward", help="a reward name (e.g. pickscore) or module:function / module:Class")
    srv.add_argument("--port", type=int, default=18085, help="port (default 18085; 0: any free port)")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    srv.add_argument("--token", default=None, help="shared token clients must send (better: the environment "
                     "variable TEMPFLOW_REWARD_TOKEN, which ps does not show)")  # fmt: skip
    device = "cuda" if torch.cuda.is_available() else "cpu"
    srv.add_argument("--device", default=device, help=f"where the reward model runs (default {device}; e.g. cuda:1)")
    srv.add_argument("--set", action="append", metavar="KEY=VALUE", help="reward argument, e.g. path=/models/x")
    srv.add_argument("--allow-open", action="store_true", help="bind a non-loopback host without a token")
    srv.add_argument("--quiet", action="store_true", help="no line per request")
    srv.set_defaults(func=cmd_serve_reward)

    tiny = sub.add_parser("tiny-model", help="write a tiny random-weight SD3 / FLUX / Qwen-Image / Wan / Z-Image / "
                          "FLUX.2 / CLIP folder (offline tries)")  # fmt: skip
    tiny.add_argument("kind", choices=["sd3", "flux", "qwenimage", "wan", "zimage", "flux2", "clip"], help="sd3 | "
                      "flux | qwenimage | wan | zimage | flux2 (diffusers pipelines) | clip (a CLIPModel folder, e.g. "
                      "for pickscore)")  # fmt: skip
    tiny.add_argument("folder", help="where to write it (must not exist or be empty)")
    tiny.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    tiny.set_defaults(func=cmd_tiny_model)

    doctor = sub.add_parser("doctor", help="report installed parts, built extensions and backends")
    doctor.set_defaults(func=cmd_doctor)
    for action in sub._choices_actions:  # each command's --help opens with what it does
        command = sub.choices[action.dest]
        command.description = command.description or action.help[0].upper() + action.help[1:] + "."
    return parser


def main(argv: list[str] | None = None) -> int:
    from .rewards.base import RewardError
    from .train.runfolder import CheckpointError, RunFolderError

    args = build_parser().parse_args(argv)
    flags = {"samples": "--samples", "steps": "--steps", "eval_steps": "--steps", "per_prompt": "--per-prompt",
             "scale": "--scale"}  # fmt: skip
    bad = [flag for name, flag in flags.items() if getattr(args, name, None) is not None
           and min(np.atleast_1d(getattr(args, name))) < 1]  # fmt: skip
    if bad:
        print(f"tempflow {args.command}: error: {', '.join(bad)} must be positive", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError, KeyError, ImportError, RewardError, RunFolderError,
            CheckpointError) as exc:  # OSError: files, ports  # fmt: skip
        print(f"tempflow {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
