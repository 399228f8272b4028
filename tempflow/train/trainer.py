"""The trainer: rollout with the engine -> advantages -> the fused K-action loss over the trained states -> AdamW
with gradient clipping -> EMA of the trainable weights -> metrics -> held-out evaluation -> atomic checkpoint.

Read it top to bottom in :func:`train`; the maths lives in small tested functions (tempflow.train.advantages,
tempflow.objective, tempflow.ops.branch_grpo_loss, tempflow.sde.noise_aware_weights) and the multi-process
parts in tempflow.train.distributed (one process, or DeepSpeed ZeRO-2/3 ranks: the same loop). Nothing here knows
which model, prompts or rewards it trains with: they come in as a FlowModel adapter, a PromptSource and a reward.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from types import SimpleNamespace

import torch

from .. import ops, sde
from ..models.registry import DTYPES
from ..prompts import load_prompts
from ..rewards.registry import build_reward
from ..rollout import compile_model, rollout
from ..rollout.keys import order_keys
from . import distributed
from .adaptive import AdaptiveSteps, spread_per_step
from .advantages import flow_grpo_advantages, signal_rows, tempflow_advantages
from .config import SettingError, TrainConfig
from .evaluation import evaluate
from .runfolder import RunFolder, effective_config, read_checkpoint

__all__ = [
    "TrainConfig",
    "SettingError",
    "Interrupted",
    "train",
    "load_run",
    "run_checkpoint",
    "put_weights",
    "run_config",
    "advantages",
    "prepare",
]


def run_checkpoint(run: str, log=print) -> dict:
    """A run's newest readable checkpoint (checkpoint.pt, else checkpoint.prev.pt): trained weights (``params``),
    ``ema``, ``iteration``, ``config``."""
    return read_checkpoint(run, log=log)[0]


def put_weights(model, weights, source: str = "the checkpoint") -> None:
    """Copy trained tensors (a checkpoint's ``params`` or ``ema``) into the model's trainable parameters."""
    params = list(model.trainable_parameters())
    if len(params) != len(weights) or any(p.shape != w.shape for p, w in zip(params, weights, strict=False)):
        raise ValueError(f"{source} holds {len(weights)} trained tensors that do not fit this model's {len(params)} "
                         "trainable ones: was it trained on another model, or with another lora_rank?")  # fmt: skip
    with torch.no_grad():
        for p, v in zip(params, weights, strict=True):
            p.copy_(v)


def load_run(model, run: str, use_ema: bool = False):
    """Put a run's trained weights (its checkpoint.pt; the EMA copy with ``use_ema``) into ``model``."""
    state = run_checkpoint(run)
    cfg = state["config"]
    if cfg["lora_rank"] > 0:
        model.use_lora(cfg["lora_rank"], cfg["lora_alpha"])
    weights = state["ema"] if use_ema and state["ema"] is not None else state["params"]
    put_weights(model, weights, os.path.join(run, "checkpoint.pt"))
    return model


def run_config(run: str) -> TrainConfig:
    """The settings of a run: its config.json, with the changes of later resumes (config_history.jsonl)."""
    path = os.path.join(run, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run!r} is not a tempflow run folder: no config.json (train one with tempflow train)")
    return TrainConfig.from_dict(effective_config(run), source=path)


def prepare(model, cfg: TrainConfig) -> None:
    """Weight dtype, LoRA adapters (or a frozen reference copy for full fine-tuning with KL), gradient checkpointing,
    and with ``compile`` the compiled forward (:func:`tempflow.rollout.compile_model`)."""
    dtype = DTYPES[cfg.dtype]
    module = model.trained_module()
    # the model's own dtype when it has one: a module loaded in bf16 may keep some parameters in fp32 on purpose
    # (diffusers' _keep_in_fp32_modules, e.g. Wan's norms and time embedder), which a cast would undo
    current = getattr(model, "dtype", None)
    if (current if isinstance(current, torch.dtype) else next(module.parameters()).dtype) != dtype:
        module.to(dtype)
    if cfg.lora_rank > 0:
        model.use_lora(cfg.lora_rank, cfg.lora_alpha)
    elif cfg.beta:
        if cfg.resolved_zero_stage() == 3:
            raise ValueError("a KL reference for full fine-tuning under ZeRO-3 is not supported: use LoRA (lora_rank "
                             "> 0; the reference is the adapter-disabled model), zero_stage=2 or beta=0")  # fmt: skip
        model.keep_reference_copy()
    if cfg.resolved_zero_stage() == 0:
        for p in model.trainable_parameters():  # low-precision base weights, fp32 trainable weights (no DeepSpeed)
            p.data = p.data.float()
    if cfg.grad_checkpointing:
        if not hasattr(module, "enable_gradient_checkpointing"):
            raise ValueError(f"{type(module).__name__} has no gradient checkpointing; set grad_checkpointing=false")
        module.enable_gradient_checkpointing()
    if cfg.compile != "false":  # the forward of rollouts and evaluation; the engine finds it compiled
        if cfg.resolved_zero_stage() == 3:
            raise ValueError("compile does not work with ZeRO-3 (its forward gathers partitioned weights in hooks): "
                             "set compile=false or zero_stage=2")  # fmt: skip
        compile_model(model, cfg.rollout_config().compile, cfg.max_batch)


class MetricsLog:
    """metrics.jsonl, plus TensorBoard and wandb when asked; only the main rank writes. ``kept``: the lines of an
    earlier run kept on resume (those up to the checkpoint's iteration)."""

    def __init__(self, cfg: TrainConfig, active: bool, start_iteration: int = 0):
        self.path = os.path.join(cfg.out, "metrics.jsonl")
        self.active, self.tb, self.wandb, self.kept = active, None, None, []
        if not active:
            return
        # keep the lines up to the checkpoint being resumed from (a crash after writing a line but before the next
        # checkpoint would otherwise leave it twice); a fresh run starts a fresh file
        if start_iteration and os.path.exists(self.path):
            lines = [json.loads(line) for line in open(self.path) if line.strip()]
            self.kept = [m for m in lines if m["iteration"] <= start_iteration]
        with open(self.path + ".tmp", "w") as fh:
            fh.writelines(json.dumps(m) + "\n" for m in self.kept)
        os.replace(self.path + ".tmp", self.path)
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ImportError("tensorboard=true needs tensorboard: pip install tensorboard") from exc
            self.tb = SummaryWriter(os.path.join(cfg.out, "tensorboard"))
        if cfg.wandb:
            try:
                import wandb
            except ImportError as exc:
                raise ImportError(f"wandb={cfg.wandb!r} needs wandb: pip install wandb") from exc
            self.wandb = wandb.init(project=cfg.wandb, config=cfg.to_dict(), dir=cfg.out)

    def write(self, metrics: dict) -> None:
        if not self.active:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(metrics) + "\n")
        step = metrics["iteration"]
        if self.tb is not None:
            for k, v in metrics.items():
                if k != "iteration":
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def image(self, name: str, grid_png: str, step: int) -> None:
        """A sample grid (the PNG just written) in TensorBoard / wandb too."""
        if not self.active or (self.tb is None and self.wandb is None):
            return
        import numpy as np
        from PIL import Image

        pixels = np.asarray(Image.open(grid_png).convert("RGB"))
        if self.tb is not None:
            self.tb.add_image(name, pixels, step, dataformats="HWC")
            self.tb.flush()
        if self.wandb is not None:
            import wandb

            self.wandb.log({name: wandb.Image(pixels)}, step=step)


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped the run at a safe point, after a checkpoint; ``exit_code`` is 128 + the signal."""

    def __init__(self, signum: int, iteration: int, out: str):
        self.signum, self.iteration, self.out = signum, iteration, out
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} after iteration {iteration}; checkpoint in {out}")


@contextmanager
def _stop_signals(log):
    """SIGINT / SIGTERM set a flag the loop reads at its safe points (a second one acts at once, as usual)."""
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, _frame):
        caught.append(signum)
        for s, h in previous.items():  # the next signal is handled the usual way (Ctrl-C twice: stop now)
            signal.signal(s, h)
        log(f"{signal.Signals(signum).name}: stopping after this iteration with a checkpoint (again: stop now)")

    for s in previous:
        signal.signal(s, handler)
    try:
        yield caught
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def train(model, prompts, reward, cfg: TrainConfig, *, eval_prompts=None, eval_reward=None,
          resume: bool | str = False, overwrite: bool = False, log=print, callback: Callable | None = None,
          folder: RunFolder | None = None) -> dict:  # fmt: skip
    """Fine-tune ``model`` (a FlowModel adapter) for ``cfg.iterations`` iterations; returns the last metrics.

    Args:
        prompts: the training prompts: a :class:`~tempflow.prompts.PromptSource`, ``"digits"``, a .txt / .jsonl
            path or a list of strings (each iteration draws ``cfg.prompts_per_iteration`` of them, in epochs).
        reward: any reward ``(images, prompts, metadata) -> (B,)`` or a reward setting (a name, an import path, a
            mapping name -> weight; see tempflow.rewards.registry). Its named values are logged as ``reward/<name>``.
        eval_prompts, eval_reward: the held-out prompts (same forms; None: no evaluation) and their reward (None:
            ``reward``), evaluated before training, every ``cfg.eval_every`` iterations and at the end.
        resume: False: a fresh run (refused when ``cfg.out`` holds a run, unless ``overwrite``); True: continue from
            the checkpoint (refused when there is none, or when the settings change the experiment); "auto":
            continue when there is a checkpoint, else start fresh. See :mod:`tempflow.train.runfolder`.
        callback: ``callback(model, metrics) -> bool`` after each iteration's update; True stops the run (after a
            checkpoint).
        folder: the run folder already opened (the CLI locks it before loading the model); None: opened here.

    SIGINT / SIGTERM stop the run after the current iteration with a checkpoint and raise :class:`Interrupted`.
    Launched on several processes (deepspeed / torchrun), each rank runs this same function on its share of the
    prompts; only rank 0 locks and writes the folder.
    """
    started = time.perf_counter()
    world = distributed.launched_world_size()
    if cfg.prompts_per_iteration % world:
        raise SettingError(f"prompts_per_iteration={cfg.prompts_per_iteration} must be a multiple of the {world} "
                           "ranks (prompts are sharded whole; every rank must make the same model calls)")  # fmt: skip
    main = int(os.environ.get("RANK", "0")) == 0
    own_folder = folder is None
    if own_folder:
        folder = RunFolder(cfg.out, main=main)
    try:
        resume_from = folder.open(cfg, resume, overwrite, log) if main else None  # (the CLI opened it already)
        with _stop_signals(log if main else _quiet) as caught:
            return _train(model, prompts, reward, cfg, eval_prompts, eval_reward, resume_from, folder, caught,
                          log, callback, started)  # fmt: skip
    finally:
        if own_folder:
            folder.release()


def _train(model, prompts, reward, cfg, eval_prompts, eval_reward, resume_from, folder, caught, log, callback,
           started):  # fmt: skip
    torch.manual_seed(cfg.seed)
    device = str(getattr(model, "device", "cpu"))
    prompts = load_prompts(prompts)
    reward = build_reward(reward, device=device)
    eval_prompts = load_prompts(eval_prompts) if eval_prompts is not None else None
    eval_reward = reward if eval_reward is None else build_reward(eval_reward, device=device)
    prepare(model, cfg)
    params = list(model.trainable_parameters())
    make_opt = lambda ps: torch.optim.AdamW(ps, lr=cfg.lr, weight_decay=cfg.weight_decay)
    rt, opt = distributed.start(model, params, make_opt, cfg.resolved_zero_stage(), cfg.grad_clip, cfg.dtype)
    if not rt.is_main:
        log = _quiet
    resume_from = rt.all_gather(resume_from)[0]  # rank 0 decided (it alone reads and writes the folder)
    ema = [rt.local(p).detach().float().clone() for p in params] if cfg.ema > 0 else None
    plan, rcfg = cfg.plan(), cfg.rollout_config()
    adaptive = AdaptiveSteps(plan.sde_steps, cfg.skip_spread, cfg.skip_window, cfg.skip_probe)
    table = sde.sde_table(model.time_grid(cfg.steps, device=device), cfg.schedule, cfg.noise_level)
    weights = sde.noise_aware_weights(table, plan.sde_steps) if cfg.weighting else torch.ones(cfg.steps, device=device)
    start_iter = 0
    if resume_from is not None:
        start_iter, ema, extra = _load_checkpoint(resume_from, rt, params, opt, ema)
        adaptive.load_state_dict(extra.get("adaptive"))
        log(f"resumed from {resume_from} at iteration {start_iter}")
    metrics_log = MetricsLog(cfg, rt.is_main, start_iter)
    evals = {m["iteration"]: _eval_values(m) for m in metrics_log.kept if "eval/reward" in m}

    def held_out(iteration: int) -> dict:
        t0 = time.perf_counter()
        guidance = cfg.guidance if cfg.eval_guidance is None else cfg.eval_guidance
        result = evaluate(model, eval_prompts, eval_reward, cfg.eval_steps, guidance, cfg.eval_per_prompt,
                          cfg.eval_seed, cfg.max_batch, rt)  # fmt: skip
        evals[iteration] = result.values
        if rt.is_main and result.grid is not None:
            from .plots import save_grid

            path = os.path.join(cfg.out, "samples", f"iteration{iteration:05d}.png")
            save_grid(result.grid, result.columns, path, scale=max(1, 128 // result.grid.shape[-1]))
            metrics_log.image("eval/samples", path, iteration)
        base = evals.get(0)
        log(f"held-out ({result.samples} samples, T={cfg.eval_steps}) at iteration {iteration}: "
            + ", ".join(f"{k} {v:.4g}" + (f" ({v - base[k]:+.4g})" if base and iteration and k in base else "")
                        for k, v in result.values.items()))  # fmt: skip
        return {**{f"eval/{k}": v for k, v in result.values.items()}, "eval_s": time.perf_counter() - t0}

    saved = {"iteration": start_iter if resume_from is not None else None, "at": time.monotonic()}

    def save(iteration: int) -> None:
        _save_checkpoint(folder, rt, params, opt, ema, iteration, cfg, {"adaptive": adaptive.state_dict()})
        saved.update(iteration=iteration, at=time.monotonic())
        if rt.is_main:
            _reward_curve(cfg, metrics_log.path)

    def stop_signal() -> int:
        """The signal that asked every rank to stop (0: none); all ranks agree."""
        return max(rt.all_gather(caught[0] if caught else 0))

    if eval_prompts is not None and 0 not in evals:
        metrics_log.write({"iteration": 0, **held_out(0)})
    metrics, spent = {}, 0.0
    for it in range(start_iter, cfg.iterations):
        signum = stop_signal()
        if signum:  # caught during a held-out evaluation: stop before this iteration's rollout
            if saved["iteration"] != it:
                save(it)
            log(f"stopped by {signal.Signals(signum).name} before iteration {it + 1}")
            raise Interrupted(signum, it, cfg.out)
        t0 = time.perf_counter()
        texts, meta, ids = prompts.draw(it, cfg.prompts_per_iteration, cfg.seed)
        mine = slice(rt.rank, None, rt.world)  # whole prompts per rank
        stats, active = {}, adaptive.active(it)
        it_plan = plan if active == plan.sde_steps else plan.subset(active)
        it_rcfg = rcfg if it_plan is plan else dataclasses.replace(rcfg, plan=it_plan)
        batch = rollout(model, texts[mine], reward, it_rcfg, prompt_ids=ids[mine], metadata=meta[mine], stats=stats)
        if cfg.skip_spread > 0:
            adaptive.observe(rt.all_gather(spread_per_step(batch.reward, batch.step, plan.K)))
        t1 = time.perf_counter()
        adv = advantages(batch, cfg, rt)
        loss, kl, n_states = _update(model, batch, adv, it_plan, table, weights, cfg, opt, params, rt, it)
        if ema is not None:
            with torch.no_grad():
                for e, p in zip(ema, params, strict=True):
                    e.mul_(cfg.ema).add_(rt.local(p).detach().float(), alpha=1 - cfg.ema)
        t2 = time.perf_counter()
        metrics = {"iteration": it + 1, **_reward_metrics(batch, rt), "loss": loss, "kl": kl,
                   "trained_states": n_states, "rollout_samples": sum(rt.all_gather(stats["samples_forwarded"])),
                   "rollout_s": t1 - t0, "train_s": t2 - t1}  # fmt: skip
        if cfg.skip_spread > 0:
            metrics["branch_steps"] = len(active)
        spent += t2 - t0
        left = spent / (it + 1 - start_iter) * (cfg.iterations - it - 1)
        log(f"[{it + 1}/{cfg.iterations} eta {left:.0f}s] " + " ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                                                                         if k != "iteration"))  # fmt: skip
        stop = rt.any(bool(callback(model, dict(metrics)))) if callback is not None else False
        signum = stop_signal()
        last = it + 1 == cfg.iterations or stop
        if eval_prompts is not None and (last or (cfg.eval_every and (it + 1) % cfg.eval_every == 0)):
            metrics.update(held_out(it + 1))
        metrics_log.write(metrics)
        overdue = cfg.checkpoint_minutes and rt.any(time.monotonic() - saved["at"] >= 60 * cfg.checkpoint_minutes)
        if (it + 1) % cfg.checkpoint_every == 0 or last or signum or overdue:
            save(it + 1)
        if signum:
            log(f"stopped by {signal.Signals(signum).name} after iteration {it + 1}")
            raise Interrupted(signum, it + 1, cfg.out)
        if stop:
            log(f"stopped by the callback after iteration {it + 1}")
            break
    if rt.is_main and evals:
        first, final = min(evals), max(evals)
        summary = {"base_iteration": first, "base": evals[first], "final_iteration": final, "final": evals[final],
                   "seconds": time.perf_counter() - started}  # fmt: skip
        with open(os.path.join(cfg.out, "summary.json"), "w") as fh:
            json.dump(summary, fh, indent=2)
    return metrics


def _eval_values(line: dict) -> dict:
    return {k[len("eval/") :]: v for k, v in line.items() if k.startswith("eval/")}


def _reward_metrics(batch, rt) -> dict:
    """The iteration's mean reward over rows and over the rows of the last trained step, and the mean of each of
    the reward's named values over the finished paths, summed over ranks in one collective."""
    last = batch.step == batch.step.max()
    sums = {"reward": batch.reward.sum().item(), "rows": float(len(batch)),
            "final_reward": batch.reward[last].sum().item(), "final_rows": float(last.sum()),
            "paths": float(batch.images.shape[0])}  # fmt: skip
    sums.update({f"reward/{k}": v.float().sum().item() for k, v in batch.scores.items()})
    tot = rt.all_sum_dict(sums)
    out = {"reward": tot["reward"] / tot["rows"], "final_reward": tot["final_reward"] / tot["final_rows"]}
    out.update({k: v / tot["paths"] for k, v in tot.items() if k.startswith("reward/")})
    return out


def _quiet(*_args, **_kwargs) -> None:
    pass


def advantages(batch, cfg: TrainConfig, rt: distributed.Runtime | None = None) -> torch.Tensor:
    """The rows' advantages, computed from every rank's rewards (so equal to a single process's) and sliced to
    this rank's rows. Only the four small columns travel, not the latents."""
    rt = rt or distributed.Runtime()
    names = ("prompt_id", "seed_index", "step", "reward")
    parts = rt.all_gather(tuple(getattr(batch, n).cpu() for n in names))  # one collective for all four
    full = SimpleNamespace(**{n: torch.cat([p[i] for p in parts]) for i, n in enumerate(names)})
    if cfg.method == "tempflow":
        adv = tempflow_advantages(full, cfg.group, clip=cfg.adv_clip)
    else:
        adv = flow_grpo_advantages(full, "prompt" if cfg.group == "prompt" else "global", clip=cfg.adv_clip)
    lo = sum(len(p[0]) for p in parts[: rt.rank])
    return adv[lo : lo + len(batch)].to(batch.reward.device)


def training_order(batch, first: torch.Tensor, iteration: int, seed: int) -> torch.Tensor:
    """The order keys of the trained states (rows ``first``): sorting by them gives an order that does not depend on
    which rank holds a state, so an optimizer step covers the same states on 1 or N ranks."""
    return order_keys(seed, iteration, batch.prompt_id[first], batch.seed_index[first], batch.step[first])


def _update(model, batch, adv, plan, table, weights, cfg, opt, params, rt, iteration):
    """One pass over the trained states in optimizer steps of ``states_per_step``; one forward per (seed, step)
    state serves its K actions. Returns the mean loss, the mean KL and the number of states (over all ranks)."""
    keep = signal_rows(batch, adv.cpu())  # index columns live on the CPU, latents on the model's device
    K = plan.K
    rows = torch.nonzero(keep).flatten().view(-1, K)  # rows of one state are consecutive (sorted by branch)
    first = rows[:, 0]
    keys = training_order(batch, first, iteration, cfg.seed)
    order = rt.all_gather_cat(keys).sort().values
    n_states = order.numel()
    cond = model.encode(batch.prompts)
    loss_sum = kl_sum = 0.0
    for lo in range(0, n_states, cfg.states_per_step):
        chunk = order[lo : lo + cfg.states_per_step]
        local = torch.nonzero(torch.isin(keys, chunk)).flatten()
        local = local[keys[local].argsort()]
        share = len(local) / len(chunk)
        if len(local):
            r, s = rows[local], first[local]
        else:  # every rank makes the same calls (ZeRO-3 gathers weights collectively): one with no state in this
            # step, or none with signal at all, trains a zero-weighted copy of its batch's first state (rows 0..K-1)
            r, s = torch.arange(K).view(1, K), torch.zeros(1, dtype=torch.long)
        x, step = batch.state[s], batch.step[s]
        v = model.velocity(x, table.t[step], cond, batch.prompt_index[s], cfg.guidance).float()
        v_ref = None
        if cfg.beta:
            with torch.no_grad(), model.reference():
                v_ref = model.velocity(x, table.t[step], cond, batch.prompt_index[s], cfg.guidance).float()
        loss = ops.branch_grpo_loss(v, x, batch.action[r], step, table, batch.old_log_prob[r], adv[r],
                                    weights[step], cfg.clip_eps, cfg.beta, v_ref)  # fmt: skip
        # DeepSpeed averages gradients over ranks: scaling by share * world makes that the mean over the chunk
        rt.backward_step(loss * (share * rt.world), opt, params, cfg.grad_clip)
        # this rank's part of the chunk's mean, weighted by the chunk's size; summed over ranks once at the end
        loss_sum += loss.item() * share * len(chunk)
        if v_ref is not None:
            kl_sum += sde.kl_from_velocity(v.detach(), v_ref, step, table).mean().item() * share * len(chunk)
    if n_states == 0:
        return 0.0, 0.0, 0
    return rt.all_sum(loss_sum) / n_states, rt.all_sum(kl_sum) / n_states, n_states


def _save_checkpoint(folder: RunFolder, rt, params, opt, ema, iteration, cfg, extra: dict | None = None) -> None:
    """checkpoint.pt: full trainable weights, EMA, iteration and config (what eval and sample read) and the
    optimizer state; with DeepSpeed the optimizer's partitions go to <out>/deepspeed/<tag> first, and checkpoint.pt,
    replaced last (see RunFolder.write_checkpoint), names the tag, so a crash at any point leaves a complete earlier
    checkpoint; the previous checkpoint and its partitions are kept."""
    with rt.gathered(params):
        full = [p.detach().float().clone() for p in params]
    state = {"params": full, "ema": rt.gather_full(params, ema) if ema is not None else None,
             "iteration": iteration, "config": cfg.to_dict(), "world": rt.world, **(extra or {})}  # fmt: skip
    if rt.engine is None:
        state["optimizer"] = opt.state_dict()
    else:
        tag = f"iteration{iteration}"
        rt.engine.save_checkpoint(folder.path("deepspeed"), tag=tag, save_latest=False)
        rt.barrier()
        state["deepspeed_tag"] = tag
    if rt.is_main:
        folder.write_checkpoint(state)
        if rt.engine is not None:  # partitions no kept checkpoint names (also those of an earlier crash)
            keep = folder.checkpoint_tags()
            for name in os.listdir(folder.path("deepspeed")):
                if name.startswith("iteration") and name not in keep:
                    shutil.rmtree(folder.path(os.path.join("deepspeed", name)), ignore_errors=True)
    rt.barrier()


def _load_checkpoint(path, rt, params, opt, ema):
    state = torch.load(path, weights_only=False, map_location="cpu")
    if state.get("world", 1) != rt.world:
        raise ValueError(f"{path} was written by {state.get('world', 1)} ranks, this run has {rt.world}: resume "
                         "with the same number of processes")  # fmt: skip
    if rt.engine is None:
        with torch.no_grad():
            for p, v in zip(params, state["params"], strict=True):
                p.copy_(v)
        opt.load_state_dict(state["optimizer"])
    else:
        rt.engine.load_checkpoint(os.path.join(os.path.dirname(path), "deepspeed"), tag=state["deepspeed_tag"],
                                  load_optimizer_states=True, load_lr_scheduler_states=False)  # fmt: skip
    if ema is not None and state["ema"] is not None:
        ema = [e.float() for e in rt.scatter_full(params, state["ema"])]
    return state["iteration"], ema, state


def _reward_curve(cfg: TrainConfig, metrics_path: str) -> None:
    """reward_curve.png: the mean training reward per iteration so far, and its moving average."""
    from .plots import line_chart, moving_average

    rewards = [m["reward"] for m in map(json.loads, open(metrics_path)) if "reward" in m]
    if rewards:
        line_chart({"reward": rewards, "moving average (10)": moving_average(rewards)},
                   os.path.join(cfg.out, "reward_curve.png"), title="mean reward per iteration")  # fmt: skip
