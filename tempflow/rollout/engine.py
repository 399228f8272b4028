"""The batched tree-rollout engine: every live path of every prompt advances together.

Each tick, all live items (main paths and the ODE completions of every earlier branch point, at whatever step they
are) go through the model in chunks of at most ``max_batch`` (the memory cap), with per-sample times and prompt
conditioning gathered by index. The K branches of a branch step come from the one velocity of the main path
through the fused :func:`tempflow.ops.branch_step`; the same velocity also moves the main path on by an ODE step.
Finished paths are decoded and scored in batches. Noise comes from the counter-based stream keyed by
(prompt id, seed index, step, branch), so results do not depend on the cap, the order, the backend or the ranks:
:func:`tempflow.rollout.naive.naive_rollout` (the official per-seed structure) gives the same rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .. import ops, sde
from ..models.base import Conditioning, FlowModel
from ..rewards.base import score
from .batch import RolloutBatch
from .keys import check_sizes, initial_noise, noise_keys, pack
from .plan import BranchPlan

__all__ = ["RolloutConfig", "CallableModel", "rollout"]


@dataclass
class RolloutConfig:
    plan: BranchPlan = field(default_factory=BranchPlan.tempflow)
    seeds_per_prompt: int = 4
    guidance: float | None = None
    noise_level: float = 0.7
    schedule: str = "flow-grpo"
    seed: int = 0
    max_batch: int = 256
    shuffle: int | None = None  # permute the live items each tick with this seed (tests order invariance)
    backend: str | None = None


class CallableModel(FlowModel):
    """Wraps a plain ``velocity_fn(x, t, cond_index) -> v`` (the DiffusionNFT-style convention) so other codebases
    can use the engine without a tempflow adapter. ``decode_fn`` maps final latents to what the reward takes."""

    def __init__(self, velocity_fn: Callable, latent_shape: Sequence[int], shift: float = 3.0, decode_fn=None):
        self.velocity_fn, self.latent_shape, self.shift = velocity_fn, tuple(latent_shape), shift
        self.decode_fn = decode_fn or (lambda x: x)
        self.default_guidance = 1.0

    def encode(self, prompts):
        index = torch.arange(len(prompts))
        return Conditioning({"index": index}, {"index": torch.zeros(1, dtype=torch.long)})

    def velocity(self, x, t, cond, index, guidance=None):
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
        return self.velocity_fn(x, t, index)

    def decode(self, latents):
        return self.decode_fn(latents)


class _Rows:
    """Accumulates training rows and finished paths."""

    def __init__(self):
        self.cols = {k: [] for k in ("prompt", "pid", "seed", "step", "branch", "state", "action", "logp", "path")}

    def add(self, **kw):
        for k, v in kw.items():
            self.cols[k].append(v)

    def cat(self, name):
        return torch.cat(self.cols[name]) if self.cols[name] else torch.empty(0)


def _setup(model, prompts, config, prompt_ids, latent_shape):
    """What both rollout loops start from: the config, the model as an adapter, the grid and step table, and the
    global prompt ids of the noise streams."""
    cfg = config or RolloutConfig()
    if not isinstance(model, FlowModel):
        if latent_shape is None:
            raise ValueError("a plain velocity function needs latent_shape=")
        model = CallableModel(model, latent_shape)
    # latents and the step tables live on the model's device; the small index columns stay on the CPU
    grid = model.time_grid(cfg.plan.num_steps, device=getattr(model, "device", None))
    table = sde.sde_table(grid, cfg.schedule, cfg.noise_level)
    n = len(prompts)
    pid_of = torch.arange(n) if prompt_ids is None else torch.as_tensor(prompt_ids, dtype=torch.long)
    if pid_of.shape != (n,):
        raise ValueError(f"prompt_ids must hold one id per prompt ({n}), got {tuple(pid_of.shape)}")
    check_sizes(pid_of, cfg.seeds_per_prompt, cfg.plan.num_steps, cfg.plan.K)
    return cfg, model, grid, table, pid_of


def score_paths(model, reward_fn, prompts, x, prompt_index, max_batch, metadata=None):
    """Decode and score finished latents in chunks: ``(images, rewards, parts)``, ``parts`` the reward's named
    values (tempflow.rewards.score). Images are kept on the CPU (they are for logging; the rows keep latents)."""
    images, rewards, parts = [], [], {}
    for lo in range(0, x.shape[0], max_batch):
        sl = slice(lo, lo + max_batch)
        img = model.decode(x[sl])
        p = [prompts[i] for i in prompt_index[sl].tolist()]
        meta = [metadata[i] for i in prompt_index[sl].tolist()] if metadata is not None else None
        total, named = score(reward_fn, img, p, meta)
        rewards.append(total)
        for k, v in named.items():
            parts.setdefault(k, []).append(v.float().cpu())
        images.append(img.cpu())
    return torch.cat(images), torch.cat(rewards), {k: torch.cat(v) for k, v in parts.items()}


@torch.no_grad()
def rollout(
    model: FlowModel | Callable,
    prompts: Sequence[str],
    reward_fn: Callable,
    config: RolloutConfig | None = None,
    *,
    prompt_ids: torch.Tensor | None = None,
    metadata: Sequence[dict] | None = None,
    latent_shape: Sequence[int] | None = None,
    stats: dict | None = None,
) -> RolloutBatch:
    """Roll out ``config.plan`` for every prompt and seed; returns the rows as a :class:`RolloutBatch`.

    Args:
        model: a :class:`FlowModel` adapter, or a plain ``velocity_fn(x, t, cond_index) -> v`` (then give
            ``latent_shape``; rewards see the raw latents unless you wrap it in :class:`CallableModel`).
        prompt_ids: global prompt ids for the noise streams (default 0..N-1; ranks pass their global ids).
        stats: filled with ``model_calls``, ``samples_forwarded``, ``largest_batch`` (<= ``max_batch``: what bounds
            the forward's activation memory) and ``peak_live_items`` (latents held at once).
    """
    cfg, model, grid, table, pid_of = _setup(model, prompts, config, prompt_ids, latent_shape)
    plan = cfg.plan
    T, K = plan.num_steps, plan.K
    sde_steps = torch.zeros(T + 1, dtype=torch.bool)
    sde_steps[list(plan.sde_steps)] = True
    last_branch = max(plan.sde_steps)
    cond = model.encode(list(prompts))
    n_prompts, S = len(prompts), cfg.seeds_per_prompt
    shape = tuple(model.latent_shape)

    # live items: main paths (branch mode) or trajectories, then completions
    prompt = torch.arange(n_prompts).repeat_interleave(S)
    seed_idx = torch.arange(S).repeat(n_prompts)
    live = {
        "x": initial_noise(cfg.seed, pid_of[prompt], seed_idx, shape, device=grid.device),
        "prompt": prompt,
        "seed": seed_idx,
        "step": torch.zeros(n_prompts * S, dtype=torch.long),
        "main": torch.ones(n_prompts * S, dtype=torch.bool),
        "origin": torch.full((n_prompts * S,), -1, dtype=torch.long),  # branch step a completion left from
        "branch": torch.zeros(n_prompts * S, dtype=torch.long),
    }
    rows = _Rows()
    finished = {k: [] for k in ("x", "prompt", "seed", "origin", "branch")}
    calls = forwarded = peak_live = largest = 0
    gen = torch.Generator().manual_seed(cfg.shuffle) if cfg.shuffle is not None else None
    while live["x"].shape[0]:
        if gen is not None:
            perm = torch.randperm(live["x"].shape[0], generator=gen)
            live = {k: v[perm] for k, v in live.items()}
        x, step, p = live["x"], live["step"], live["prompt"]
        peak_live = max(peak_live, x.shape[0])
        v = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        for lo in range(0, x.shape[0], cfg.max_batch):
            sl = slice(lo, lo + cfg.max_batch)
            v[sl] = model.velocity(x[sl], grid.sigmas[step[sl]], cond, p[sl], cfg.guidance).float()
            calls += 1
            forwarded += x[sl].shape[0]
            largest = max(largest, x[sl].shape[0])
        x_next = sde.ode_step(x, v, step, grid)
        stochastic = sde_steps[step] & live["main"]  # trajectories are all main paths; completions never branch
        new_items = None
        if bool(stochastic.any()):
            idx = torch.nonzero(stochastic).flatten()
            k_s = K if plan.mode == "branch" else 1
            keys = noise_keys(cfg.seed, pid_of[p[idx]], live["seed"][idx], step[idx], k_s)
            out = ops.branch_step(x[idx], v[idx], step[idx], table, k_s, keys=keys, backend=cfg.backend)
            r_prompt, r_seed = p[idx].repeat_interleave(k_s), live["seed"][idx].repeat_interleave(k_s)
            r_step, r_branch = step[idx].repeat_interleave(k_s), torch.arange(k_s).repeat(idx.numel())
            rows.add(
                prompt=r_prompt,
                pid=pid_of[r_prompt],
                seed=r_seed,
                step=r_step,
                branch=r_branch,
                state=x[idx].float().repeat_interleave(k_s, 0),
                action=out.samples.flatten(0, 1),
                logp=out.log_prob.flatten(),
                path=_path_key(plan, r_prompt, r_seed, r_step, r_branch),
            )
            if plan.mode == "branch":
                n = idx.numel()
                new_items = {
                    "x": out.samples.flatten(0, 1),
                    "prompt": p[idx].repeat_interleave(K),
                    "seed": live["seed"][idx].repeat_interleave(K),
                    "step": step[idx].repeat_interleave(K) + 1,
                    "main": torch.zeros(n * K, dtype=torch.bool),
                    "origin": step[idx].repeat_interleave(K),
                    "branch": torch.arange(K).repeat(n),
                }
            else:
                x_next[idx] = out.samples[:, 0]
        live["x"], live["step"] = x_next, step + 1
        if new_items is not None:
            live = {k: torch.cat([live[k], new_items[k]]) for k in live}
        done = live["step"] >= T
        if plan.mode == "branch":
            done = done & ~live["main"]
            drop = live["main"] & (live["step"] > last_branch)  # the main path is no longer needed
        else:
            drop = torch.zeros_like(done)
        for k in finished:
            finished[k].append(live[k][done])
        live = {k: v[~(done | drop)] for k, v in live.items()}

    fin = {k: torch.cat(v) for k, v in finished.items()}
    images, rewards, parts = score_paths(model, reward_fn, list(prompts), fin["x"], fin["prompt"], cfg.max_batch,
                                         metadata)  # fmt: skip
    fin_key = _path_key(plan, fin["prompt"], fin["seed"], fin["origin"], fin["branch"])
    if stats is not None:
        # peak memory: the largest forward batch (bounded by max_batch) and the latents held live at once
        stats.update(model_calls=calls, samples_forwarded=forwarded, largest_batch=largest, peak_live_items=peak_live)
    return _assemble(rows, list(prompts), fin_key, rewards, images, fin["prompt"], parts)


def _path_key(plan: BranchPlan, prompt, seed, step, branch) -> torch.Tensor:
    """Which finished path rewards a row: a branch's own completion (prompt, seed, step, branch), or, for a
    trajectory plan, the trajectory of (prompt, seed)."""
    if plan.mode == "branch":
        return pack(prompt, seed, step, branch)
    return pack(prompt, seed, -1)


def _assemble(rows: _Rows, prompts, fin_key, rewards, images, image_prompt, parts) -> RolloutBatch:
    """Rows in canonical order, each with the reward of the path it led to; finished paths (images, their prompt
    and the reward's named values) in the order of their keys."""
    path = rows.cat("path")
    order_f = torch.argsort(fin_key)
    pos = torch.searchsorted(fin_key[order_f], path)
    reward = rewards[order_f][pos]
    prompt, seed, step, branch = rows.cat("prompt"), rows.cat("seed"), rows.cat("step"), rows.cat("branch")
    order = torch.argsort(pack(prompt, seed, step, branch))
    img_order = torch.argsort(fin_key)
    return RolloutBatch(
        prompts=prompts,
        prompt_index=prompt[order],
        prompt_id=rows.cat("pid")[order],
        seed_index=seed[order],
        step=step[order],
        branch=branch[order],
        state=rows.cat("state")[order],
        action=rows.cat("action")[order],
        old_log_prob=rows.cat("logp")[order],
        reward=reward[order],
        images=images[img_order],
        image_prompt=image_prompt[img_order],
        scores={k: v[img_order] for k, v in parts.items()},
    )
