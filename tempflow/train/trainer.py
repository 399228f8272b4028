"""The trainer: rollout with the engine -> advantages -> the fused K-action loss over the trained states -> AdamW
with gradient clipping -> EMA of the trainable weights -> metrics -> atomic checkpoint.

Read it top to bottom in :func:`train`; the maths lives in small tested functions (tempflow.train.advantages,
tempflow.objective, tempflow.ops.branch_grpo_loss, tempflow.sde.noise_aware_weights) and the multi-process
parts in tempflow.train.distributed (one process, or DeepSpeed ZeRO-2/3 ranks: the same loop).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from types import SimpleNamespace

import torch

from .. import ops, rng, sde
from .._io import atomic_torch_save
from ..rollout import BranchPlan, RolloutConfig, rollout
from . import distributed
from .advantages import flow_grpo_advantages, signal_rows, tempflow_advantages

ORDER_TAG = 0x7F4A_0D3E  # stream id tag of the training-order hash (disjoint from sampling noise streams)


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Every knob of a run; printed at start and saved with the run (config.json)."""

    method: str = _f("tempflow", "tempflow (branching, process rewards) or flow-grpo (SDE trajectories)")
    steps: int = _f(10, "sampling steps T")
    branches: int = _f(6, "K branches per branch step (tempflow)")
    seeds_per_prompt: int = _f(4, "N seeds per prompt (tempflow) or G trajectories per prompt (flow-grpo)")
    prompts_per_iteration: int = _f(2, "prompts rolled out per iteration")
    iterations: int = _f(60, "training iterations (rollout + update)")
    group: str = _f(
        "seed",
        "advantage group of tempflow: seed | prompt | global; of flow-grpo: prompt (per-prompt "
        "std), otherwise the global std",
    )
    weighting: bool = _f(True, "noise-aware weighting of the policy term (tempflow)")
    noise_level: float = _f(0.7, "SDE noise level a")
    schedule: str = _f("flow-grpo", "SDE noise schedule: flow-grpo | cps | dance (ALGORITHM.md section 1)")
    guidance: float = _f(2.0, "classifier-free guidance in sampling and training")
    clip_eps: float = _f(1e-3, "PPO clip range of the ratio (log-probs are averaged, so it is small)")
    beta: float = _f(0.0, "weight of the exact KL to the LoRA-disabled base model")
    lr: float = _f(3e-4, "AdamW learning rate")
    lora_rank: int = _f(16, "LoRA rank (0: full fine-tuning)")
    lora_alpha: int = _f(32, "LoRA alpha")
    grad_clip: float = _f(1.0, "gradient norm clip")
    states_per_step: int = _f(
        6,
        "trained (seed, step) states per optimizer step (6: 12 updates per default "
        "iteration; 36, 2 updates, learned slower in bench/bench_train.py)",
    )
    ema: float = _f(0.9, "EMA decay of the trainable weights (0 disables)")
    max_batch: int = _f(32, "rollout engine's maximum batch per model call")
    seed: int = _f(0, "run seed (noise streams, prompt order)")
    precision: str = _f("fp32", "weights of the denoiser: fp32 | bf16 | fp16 (trainable weights and loss maths fp32)")
    grad_checkpointing: bool = _f(False, "recompute the transformer's activations in backward (less memory)")
    zero_stage: int = _f(-1, "DeepSpeed ZeRO stage 2 or 3; 0: none (one process); -1: 3 when launched on several")
    out: str = _f("runs/digits", "output folder: config, metrics.jsonl, checkpoint.pt")
    checkpoint_every: int = _f(10, "iterations between checkpoints, reward-curve PNGs and sample grids")
    tensorboard: bool = _f(False, "also log metrics to TensorBoard (<out>/tensorboard; needs tensorboard)")
    wandb: str = _f("", "also log metrics to this Weights & Biases project (needs wandb)")

    def validate(self) -> None:
        if self.method not in ("tempflow", "flow-grpo"):
            raise ValueError(f"method must be tempflow or flow-grpo, got {self.method!r}")
        for name in ("steps", "branches", "seeds_per_prompt", "prompts_per_iteration", "iterations",
                     "states_per_step", "max_batch"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.zero_stage not in (-1, 0, 2, 3):
            raise ValueError(f"zero_stage must be -1 (auto), 0, 2 or 3, got {self.zero_stage}")
        if self.schedule not in sde.SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(sde.SCHEDULES)}, got {self.schedule!r}")
        if self.group not in ("seed", "prompt", "global"):
            raise ValueError(f"group must be seed, prompt or global, got {self.group!r}")

    def resolved_zero_stage(self) -> int:
        if self.zero_stage == -1:
            return 3 if distributed.launched_world_size() > 1 else 0
        return self.zero_stage

    @classmethod
    def help(cls) -> str:
        return "\n".join(f"  {f.name} = {f.default!r}: {f.metadata['help']}" for f in fields(cls))


def plan_for(cfg: TrainConfig) -> BranchPlan:
    if cfg.method == "tempflow":
        return BranchPlan.tempflow(cfg.steps, cfg.branches)
    return BranchPlan.flow_grpo(cfg.steps, range(cfg.steps - 1))


def prompts_for(iteration: int, cfg: TrainConfig) -> tuple[list[str], torch.Tensor]:
    """The iteration's digit prompts: a seeded walk over 0..9, so a resumed run sees the same ones."""
    from ..models.digits import prompt_for

    g = torch.Generator().manual_seed(cfg.seed * 100_003 + iteration)
    digits = torch.randperm(10, generator=g)[: cfg.prompts_per_iteration]
    ids = digits + 10 * iteration  # global ids for the noise streams: fresh noise every iteration
    return [prompt_for(int(d)) for d in digits], ids


def load_run(model, run: str, use_ema: bool = False):
    """Put a run's trained weights (its checkpoint.pt; the EMA copy with ``use_ema``) into ``model``."""
    path = os.path.join(run, "checkpoint.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint in {run!r}: train first (tempflow train --set out={run})")
    state = torch.load(path, weights_only=False)
    cfg = state["config"]
    if cfg["lora_rank"] > 0:
        model.use_lora(cfg["lora_rank"], cfg["lora_alpha"])
    weights = state["ema"] if use_ema and state["ema"] is not None else state["params"]
    with torch.no_grad():
        for p, v in zip(model.trainable_parameters(), weights, strict=True):
            p.copy_(v)
    return model


def prepare(model, cfg: TrainConfig) -> None:
    """Precision, LoRA adapters (or a frozen reference copy for full fine-tuning with KL), gradient checkpointing."""
    if cfg.precision != "fp32":
        model.trained_module().to({"bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision])
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
        module = model.trained_module()
        if not hasattr(module, "enable_gradient_checkpointing"):
            raise ValueError(f"{type(module).__name__} has no gradient checkpointing; set grad_checkpointing=false")
        module.enable_gradient_checkpointing()


class MetricsLog:
    """metrics.jsonl, plus TensorBoard and wandb when asked; only the main rank writes."""

    def __init__(self, cfg: TrainConfig, active: bool, start_iteration: int = 0):
        self.path = os.path.join(cfg.out, "metrics.jsonl")
        self.active, self.tb, self.wandb = active, None, None
        if not active:
            return
        # keep the lines up to the checkpoint being resumed from (a crash after writing a line but before the next
        # checkpoint would otherwise leave it twice); a fresh run starts a fresh file
        kept = []
        if start_iteration and os.path.exists(self.path):
            kept = [line for line in open(self.path) if json.loads(line)["iteration"] <= start_iteration]
        with open(self.path + ".tmp", "w") as fh:
            fh.writelines(kept)
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
            self.wandb = wandb.init(project=cfg.wandb, config=asdict(cfg), dir=cfg.out)

    def write(self, metrics: dict) -> None:
        if not self.active:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(metrics) + "\n")
        step = metrics["iteration"]
        for k, v in metrics.items():
            if self.tb is not None and k != "iteration":
                self.tb.add_scalar(k, v, step)
        if self.tb is not None:
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)


def train(model, reward_fn, cfg: TrainConfig, resume: bool = False, log=print, evaluate=None) -> dict:
    """Run ``cfg.iterations`` iterations on ``model`` (a FlowModel adapter); returns the last metrics. Launched on
    several processes (deepspeed / torchrun), each rank runs this same function on its share of the prompts."""
    cfg.validate()
    torch.manual_seed(cfg.seed)
    prepare(model, cfg)
    params = list(model.trainable_parameters())
    rt, opt = distributed.start(model, params, lambda ps: torch.optim.AdamW(ps, lr=cfg.lr, weight_decay=0.0),
                                cfg.resolved_zero_stage(), cfg.grad_clip, cfg.precision)  # fmt: skip
    if cfg.prompts_per_iteration % rt.world:
        raise ValueError(f"prompts_per_iteration={cfg.prompts_per_iteration} must be a multiple of the {rt.world} "
                         "ranks (prompts are sharded whole; every rank must make the same model calls)")  # fmt: skip
    if not rt.is_main:
        log = _quiet
    else:
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, "config.json"), "w") as fh:
            json.dump(asdict(cfg), fh, indent=2)
    rt.barrier()
    ema = [rt.local(p).detach().float().clone() for p in params] if cfg.ema > 0 else None
    plan = plan_for(cfg)
    grid = model.time_grid(cfg.steps)
    table = sde.sde_table(grid, cfg.schedule, cfg.noise_level)
    weights = sde.noise_aware_weights(table, plan.sde_steps) if cfg.weighting else torch.ones(cfg.steps)
    ckpt = os.path.join(cfg.out, "checkpoint.pt")
    start_iter = 0
    if resume and os.path.exists(ckpt):
        start_iter, ema = _load_checkpoint(ckpt, rt, params, opt, ema)
        log(f"resumed from {ckpt} at iteration {start_iter}")
    metrics_log = MetricsLog(cfg, rt.is_main, start_iter)
    metrics, spent = {}, 0.0
    for it in range(start_iter, cfg.iterations):
        t0 = time.perf_counter()
        prompts, ids = prompts_for(it, cfg)
        mine = slice(rt.rank, None, rt.world)  # whole prompts per rank
        rcfg = RolloutConfig(plan=plan, seeds_per_prompt=cfg.seeds_per_prompt, guidance=cfg.guidance,
                             noise_level=cfg.noise_level, schedule=cfg.schedule, seed=cfg.seed,
                             max_batch=cfg.max_batch)  # fmt: skip
        batch = rollout(model, prompts[mine], reward_fn, rcfg, prompt_ids=ids[mine])
        t1 = time.perf_counter()
        adv = advantages(batch, cfg, rt)
        loss, kl, n_states = _update(model, batch, adv, plan, table, weights, cfg, opt, params, rt, it)
        if ema is not None:
            with torch.no_grad():
                for e, p in zip(ema, params, strict=True):
                    e.mul_(cfg.ema).add_(rt.local(p).detach().float(), alpha=1 - cfg.ema)
        t2 = time.perf_counter()
        rows = rt.all_sum(len(batch))
        last = batch.step == batch.step.max()
        metrics = {
            "iteration": it + 1,
            "reward": rt.all_sum(batch.reward.sum().item()) / rows,
            "final_reward": rt.all_sum(batch.reward[last].sum().item()) / rt.all_sum(int(last.sum())),
            "loss": loss,
            "kl": kl,
            "trained_states": n_states,
            "rollout_s": t1 - t0,
            "train_s": t2 - t1,
        }
        metrics_log.write(metrics)
        spent += t2 - t0
        left = spent / (it + 1 - start_iter) * (cfg.iterations - it - 1)
        shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "iteration")
        log(f"[{it + 1}/{cfg.iterations} eta {left:.0f}s] {shown}")
        if (it + 1) % cfg.checkpoint_every == 0 or it + 1 == cfg.iterations:
            _save_checkpoint(ckpt, rt, params, opt, ema, it + 1, cfg)
            _report(model, cfg, metrics_log.path, rt)
        if evaluate is not None:
            evaluate(model, it + 1)
    return metrics


def _quiet(*_args, **_kwargs) -> None:
    pass


def advantages(batch, cfg: TrainConfig, rt: distributed.Runtime | None = None) -> torch.Tensor:
    """The rows' advantages, computed from every rank's rewards (so equal to a single process's) and sliced to
    this rank's rows. Only the four small columns travel, not the latents."""
    rt = rt or distributed.Runtime()
    names = ("prompt_id", "seed_index", "step", "reward")
    cols = tuple(getattr(batch, n) for n in names)
    parts = rt.all_gather(cols if rt.world == 1 else tuple(c.cpu() for c in cols))  # one collective for all four
    full = SimpleNamespace(**{n: torch.cat([p[i] for p in parts]) for i, n in enumerate(names)})
    if cfg.method == "tempflow":
        adv = tempflow_advantages(full, cfg.group)
    else:
        adv = flow_grpo_advantages(full, "prompt" if cfg.group == "prompt" else "global")
    lo = sum(len(p[0]) for p in parts[: rt.rank])
    return adv[lo : lo + len(batch)].to(batch.reward.device)


def training_order(batch, first: torch.Tensor, iteration: int, seed: int) -> torch.Tensor:
    """A 64-bit hash of (iteration, prompt id, seed, step) for each trained state: sorting by it gives an order that
    does not depend on which rank holds a state, so an optimizer step covers the same states on 1 or N ranks."""
    ids = torch.stack([torch.full_like(first, ORDER_TAG), torch.full_like(first, iteration), batch.prompt_id[first],
                       batch.seed_index[first], batch.step[first]], dim=-1)  # fmt: skip
    return rng.stream_keys(seed, ids)


def _update(model, batch, adv, plan, table, weights, cfg, opt, params, rt, iteration):
    """One pass over the trained states in optimizer steps of ``states_per_step``; one forward per (seed, step)
    state serves its K actions. Returns the mean loss, the mean KL and the number of states (over all ranks)."""
    keep = signal_rows(batch, adv)
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


def _save_checkpoint(path, rt, params, opt, ema, iteration, cfg) -> None:
    """checkpoint.pt: full trainable weights, EMA, iteration and config (what eval and sample read) and the
    optimizer state; with DeepSpeed the optimizer's partitions go to <out>/deepspeed/<tag> first, and checkpoint.pt,
    replaced atomically last, names the tag, so a crash at any point leaves a complete earlier checkpoint."""
    with rt.gathered(params):
        full = [p.detach().float().clone() for p in params]
    state = {"params": full, "ema": rt.gather_full(params, ema) if ema is not None else None,
             "iteration": iteration, "config": asdict(cfg), "world": rt.world}  # fmt: skip
    if rt.engine is None:
        state["optimizer"] = opt.state_dict()
    else:
        tag = f"iteration{iteration}"
        folder = os.path.join(os.path.dirname(path), "deepspeed")
        rt.engine.save_checkpoint(folder, tag=tag, save_latest=False)
        rt.barrier()
        state["deepspeed_tag"] = tag
    if rt.is_main:
        atomic_torch_save(state, path)
        if rt.engine is not None:  # partitions no checkpoint.pt names any more (also those of an earlier crash)
            folder = os.path.join(os.path.dirname(path), "deepspeed")
            for name in os.listdir(folder):
                if name.startswith("iteration") and name != state["deepspeed_tag"]:
                    shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
    rt.barrier()


def _load_checkpoint(path, rt, params, opt, ema):
    state = torch.load(path, weights_only=False)
    if state.get("world", 1) != rt.world:
        raise ValueError(f"{path} was written by {state.get('world', 1)} ranks, this run has {rt.world}: resume "
                         "with the same number of processes")  # fmt: skip
    if rt.engine is None:
        with torch.no_grad():
            for p, v in zip(params, state["params"], strict=True):
                p.copy_(v)
        opt.load_state_dict(state["optimizer"])
    else:
        folder = os.path.join(os.path.dirname(path), "deepspeed")
        rt.engine.load_checkpoint(folder, tag=state["deepspeed_tag"], load_optimizer_states=True,
                                  load_lr_scheduler_states=False)  # fmt: skip
    if ema is not None and state["ema"] is not None:
        ema = [e.float() for e in rt.scatter_full(params, state["ema"])]
    return state["iteration"], ema


def _report(model, cfg: TrainConfig, metrics_path: str, rt) -> None:
    """The reward curve so far (reward_curve.png) and a grid of the current policy's samples (samples.png). Every
    rank samples (ZeRO-3 forwards are collective); the main rank writes."""
    from ..models.base import sample
    from .plots import line_chart, moving_average, save_grid

    if rt.is_main:
        rewards = [json.loads(line)["reward"] for line in open(metrics_path)]
        line_chart({"reward": rewards, "moving average (10)": moving_average(rewards)},
                   os.path.join(cfg.out, "reward_curve.png"), title="mean reward per iteration")  # fmt: skip
    if hasattr(model, "decode"):
        from ..models.digits import prompt_for

        prompts = [prompt_for(d) for d in range(10) for _ in range(4)]
        with torch.no_grad():
            images = model.decode(sample(model, prompts, cfg.steps, cfg.guidance, seed=cfg.seed + 1))
        if rt.is_main:
            save_grid(images, 4, os.path.join(cfg.out, "samples.png"))
