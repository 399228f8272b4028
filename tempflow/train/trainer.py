"""The trainer, single process: rollout with the engine -> advantages -> the fused K-action loss over the trained
states -> AdamW with gradient clipping -> EMA of the trainable weights -> metrics -> atomic checkpoint.

Read it top to bottom in :func:`train`; the maths lives in small tested functions (tempflow.train.advantages,
tempflow.objective, tempflow.ops.branch_grpo_loss, tempflow.sde.noise_aware_weights).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, fields

import torch

from .. import ops, sde
from .._io import atomic_torch_save
from ..rollout import BranchPlan, RolloutConfig, rollout
from .advantages import flow_grpo_advantages, signal_rows, tempflow_advantages


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
    group: str = _f("seed", "advantage group: seed | prompt | global (tempflow); global | prompt std (flow-grpo)")
    weighting: bool = _f(True, "noise-aware weighting of the policy term (tempflow)")
    noise_level: float = _f(0.7, "SDE noise level a")
    guidance: float = _f(2.0, "classifier-free guidance in sampling and training")
    clip_eps: float = _f(1e-3, "PPO clip range of the ratio (log-probs are averaged, so it is small)")
    beta: float = _f(0.0, "weight of the exact KL to the LoRA-disabled base model")
    lr: float = _f(3e-4, "AdamW learning rate")
    lora_rank: int = _f(16, "LoRA rank (0: full fine-tuning)")
    lora_alpha: int = _f(32, "LoRA alpha")
    grad_clip: float = _f(1.0, "gradient norm clip")
    states_per_step: int = _f(36, "trained (seed, step) states per optimizer step")
    ema: float = _f(0.9, "EMA decay of the trainable weights (0 disables)")
    max_batch: int = _f(32, "rollout engine's maximum batch per model call")
    seed: int = _f(0, "run seed (noise streams, prompt order)")
    out: str = _f("runs/digits", "output folder: config, metrics.jsonl, checkpoint.pt")
    checkpoint_every: int = _f(10, "iterations between checkpoints, reward-curve PNGs and sample grids")

    def validate(self) -> None:
        if self.method not in ("tempflow", "flow-grpo"):
            raise ValueError(f"method must be tempflow or flow-grpo, got {self.method!r}")
        for name in ("steps", "branches", "seeds_per_prompt", "prompts_per_iteration", "iterations",
                     "states_per_step", "max_batch"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

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


def train(model, reward_fn, cfg: TrainConfig, resume: bool = False, log=print, evaluate=None) -> dict:
    """Run ``cfg.iterations`` iterations on ``model`` (a FlowModel adapter); returns the last metrics."""
    cfg.validate()
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, "config.json"), "w") as fh:
        json.dump(asdict(cfg), fh, indent=2)
    torch.manual_seed(cfg.seed)
    if cfg.lora_rank > 0:
        model.use_lora(cfg.lora_rank, cfg.lora_alpha)
    params = list(model.trainable_parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    ema = [p.detach().clone() for p in params] if cfg.ema > 0 else None
    plan = plan_for(cfg)
    grid = model.time_grid(cfg.steps)
    table = sde.sde_table(grid, "flow-grpo", cfg.noise_level)
    weights = sde.noise_aware_weights(table, plan.sde_steps) if cfg.weighting else torch.ones(cfg.steps)
    ckpt = os.path.join(cfg.out, "checkpoint.pt")
    start_iter = 0
    if resume and os.path.exists(ckpt):
        state = torch.load(ckpt, weights_only=False)
        for p, v in zip(params, state["params"], strict=True):
            p.data.copy_(v)
        opt.load_state_dict(state["optimizer"])
        ema = state["ema"]
        start_iter = state["iteration"]
        log(f"resumed from {ckpt} at iteration {start_iter}")
    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    metrics = {}
    for it in range(start_iter, cfg.iterations):
        t0 = time.perf_counter()
        prompts, ids = prompts_for(it, cfg)
        rcfg = RolloutConfig(plan=plan, seeds_per_prompt=cfg.seeds_per_prompt, guidance=cfg.guidance,
                             noise_level=cfg.noise_level, seed=cfg.seed, max_batch=cfg.max_batch)  # fmt: skip
        batch = rollout(model, prompts, reward_fn, rcfg, prompt_ids=ids)
        t1 = time.perf_counter()
        if cfg.method == "tempflow":
            adv = tempflow_advantages(batch, cfg.group)
        else:
            adv = flow_grpo_advantages(batch, "prompt" if cfg.group == "prompt" else "global")
        loss_sum, kl_sum, n_states = _update(model, batch, adv, plan, table, weights, cfg, opt, params)
        if ema is not None:
            with torch.no_grad():
                for e, p in zip(ema, params, strict=True):
                    e.mul_(cfg.ema).add_(p.detach(), alpha=1 - cfg.ema)
        t2 = time.perf_counter()
        metrics = {
            "iteration": it + 1,
            "reward": batch.reward.mean().item(),
            "final_reward": _final_reward(batch),
            "loss": loss_sum,
            "kl": kl_sum,
            "trained_states": n_states,
            "rollout_s": t1 - t0,
            "train_s": t2 - t1,
        }
        with open(metrics_path, "a") as fh:
            fh.write(json.dumps(metrics) + "\n")
        log(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
        if (it + 1) % cfg.checkpoint_every == 0 or it + 1 == cfg.iterations:
            atomic_torch_save({"params": [p.detach().clone() for p in params], "optimizer": opt.state_dict(),
                                   "ema": ema, "iteration": it + 1, "config": asdict(cfg)}, ckpt)  # fmt: skip
            _report(model, cfg, metrics_path)
        if evaluate is not None:
            evaluate(model, it + 1)
    return metrics


def _report(model, cfg: TrainConfig, metrics_path: str) -> None:
    """The reward curve so far (reward_curve.png) and a grid of the current policy's samples (samples.png)."""
    from ..models.base import sample
    from .plots import line_chart, moving_average, save_grid

    rewards = [json.loads(line)["reward"] for line in open(metrics_path)]
    line_chart({"reward": rewards, "moving average (10)": moving_average(rewards)},
               os.path.join(cfg.out, "reward_curve.png"), title="mean reward per iteration")  # fmt: skip
    if hasattr(model, "decode"):
        from ..models.digits import prompt_for

        prompts = [prompt_for(d) for d in range(10) for _ in range(4)]
        with torch.no_grad():
            images = model.decode(sample(model, prompts, cfg.steps, cfg.guidance, seed=cfg.seed + 1))
        save_grid(images, 4, os.path.join(cfg.out, "samples.png"))


def _final_reward(batch) -> float:
    """Mean reward of the rows at the last trained step (their images are the closest to the policy's own)."""
    last = batch.step == batch.step.max()
    return batch.reward[last].mean().item()


def _update(model, batch, adv, plan, table, weights, cfg, opt, params):
    """One pass over the trained states: one forward per (seed, step) state serves its K actions."""
    keep = signal_rows(batch, adv)
    K = plan.K
    n_states = int(keep.sum()) // K
    if n_states == 0:
        return 0.0, 0.0, 0
    rows = torch.nonzero(keep).flatten().view(-1, K)  # rows of one state are consecutive (sorted by branch)
    first = rows[:, 0]
    cond = model.encode(batch.prompts)
    order = torch.randperm(n_states, generator=torch.Generator().manual_seed(cfg.seed + int(batch.prompt_id[0])))
    loss_sum = kl_sum = 0.0
    for lo in range(0, n_states, cfg.states_per_step):
        pick = order[lo : lo + cfg.states_per_step]
        r = rows[pick]
        s = first[pick]
        x, step = batch.state[s], batch.step[s]
        v = model.velocity(x, table.t[step], cond, batch.prompt_index[s], cfg.guidance).float()
        v_ref = None
        if cfg.beta:
            with torch.no_grad(), model.reference():
                v_ref = model.velocity(x, table.t[step], cond, batch.prompt_index[s], cfg.guidance).float()
        loss = ops.branch_grpo_loss(v, x, batch.action[r], step, table, batch.old_log_prob[r], adv[r],
                                    weights[step], cfg.clip_eps, cfg.beta, v_ref)  # fmt: skip
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        loss_sum += loss.item() * len(pick) / n_states
        if v_ref is not None:
            kl_sum += sde.kl_from_velocity(v.detach(), v_ref, step, table).mean().item() * len(pick) / n_states
    return loss_sum, kl_sum, n_states
