"""The batched tree-rollout engine: every live path of every prompt advances together.

Each tick, all live items (main paths and the ODE completions of every earlier branch point, at whatever step they
are) go through the model in forwards of at most ``max_batch`` rows (the memory cap; with classifier-free guidance
an item is a pair of rows), with per-sample times and prompt conditioning gathered by index. The K branches of a
branch step come from the one velocity of the main path through the fused :func:`tempflow.ops.branch_step`; the
same velocity also moves the main path on by an ODE step. Finished paths are decoded and scored in batches.
Noise comes from the counter-based stream keyed by (prompt id, seed index, step, branch), so results do not depend
on the cap, the order, the backend or the ranks: :func:`tempflow.rollout.naive.naive_rollout` (the official
per-seed structure) gives the same rows.

The starting latents can instead be given (``initial_noise=``) or drawn from a ``torch.Generator`` exactly as the
diffusers pipelines draw them (``generator=``), so that the main paths of an official run can be reproduced; the
branch noise stays the counter-based stream.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .. import ops, sde
from ..models.base import Conditioning, FlowModel
from ..rewards.base import score
from .batch import RolloutBatch
from .keys import check_sizes, noise_keys, pack
from .keys import initial_noise as counter_noise
from .plan import BranchPlan

__all__ = ["RolloutConfig", "CallableModel", "rollout", "start_latents", "prompt_major"]


@dataclass
class RolloutConfig:
    """What one rollout does (the trainer builds it with ``TrainConfig.rollout_config()``).

    ``max_batch``: the most rows one transformer forward sees. With classifier-free guidance every sample is a pair
    of rows (its unconditional and conditional halves go through together), so a forward takes at most
    ``max_batch // 2`` samples; without it (guidance 1, FLUX.1-dev's guidance embedding, a plain velocity
    function) ``max_batch`` samples. Finished paths are decoded and scored in chunks of that many samples too.
    The default, 48 rows (24 samples with their CFG pairs), is the official code's largest forward as issue 13
    counts it (the SD3 configs of Flow-GRPO and TempFlow-GRPO forward 9 or 12 samples per sampling call and 16 per
    evaluation call, each with its CFG pair: 18 to 32 rows), so one forward's activation memory stays that of an
    official run. Raise it on a large GPU for speed: the samples do not depend on it beyond the last bits of the
    model's batched arithmetic."""

    plan: BranchPlan = field(default_factory=BranchPlan.tempflow)
    seeds_per_prompt: int = 4
    guidance: float | None = None
    noise_level: float = 0.7
    schedule: str = "flow-grpo"
    seed: int = 0
    max_batch: int = 48  # rows per forward, a CFG pair counting two
    shuffle: int | None = None  # permute the live items each tick with this seed (tests order invariance)
    backend: str | None = None


class CallableModel(FlowModel):
    """Wraps a plain ``velocity_fn(x, t, cond_index) -> v`` (the DiffusionNFT-style convention) so other codebases
    can use the engine without a tempflow adapter. ``decode_fn`` maps final latents to what the reward takes;
    ``rows_per_sample``: the rows ``velocity_fn`` forwards per sample (2 if it does its own CFG pair), so that
    ``max_batch`` still bounds the rows of its forwards."""

    def __init__(self, velocity_fn: Callable, latent_shape: Sequence[int], shift: float = 3.0, decode_fn=None,
                 rows_per_sample: int = 1):  # fmt: skip
        self.velocity_fn, self.latent_shape, self.shift = velocity_fn, tuple(latent_shape), shift
        self.decode_fn = decode_fn or (lambda x: x)
        self.default_guidance = 1.0
        self.rows_per_sample = int(rows_per_sample)  # 2 if velocity_fn doubles its batch for CFG itself
        if self.rows_per_sample < 1:
            raise ValueError(f"rows_per_sample must be >= 1, got {rows_per_sample}")

    def forward_rows(self, guidance=None) -> int:
        return self.rows_per_sample

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


def start_latents(model: FlowModel, config: RolloutConfig, prompt_ids: torch.Tensor, initial_noise=None,
                  generator=None, device=None) -> torch.Tensor:  # fmt: skip
    """The starting latents of every (prompt, seed) path, ``(len(prompt_ids) * seeds_per_prompt, *latent_shape)``
    in fp32, row ``p * seeds_per_prompt + s`` being prompt p's seed s (prompt-major, the order of diffusers'
    ``num_images_per_prompt``). By default the counter-based stream of (prompt id, seed index); ``initial_noise``
    gives them; ``generator`` (a ``torch.Generator`` or a list, one per row) draws them as the diffusers pipelines
    do (:meth:`FlowModel.initial_latents`: ``randn_tensor`` in the model's dtype, packed for FLUX)."""
    S = config.seeds_per_prompt
    n = prompt_ids.numel() * S
    shape = tuple(model.latent_shape)
    if initial_noise is not None and generator is not None:
        raise ValueError("give initial_noise= or generator=, not both")
    if generator is not None:
        initial_noise = model.initial_latents(n, generator)
    if initial_noise is None:
        prompt = torch.arange(prompt_ids.numel()).repeat_interleave(S)
        return counter_noise(config.seed, prompt_ids[prompt], torch.arange(S).repeat(prompt_ids.numel()), shape,
                             device=device)  # fmt: skip
    x = torch.as_tensor(initial_noise)
    if tuple(x.shape) != (n, *shape):
        raise ValueError(f"initial_noise must be (prompts x seeds_per_prompt, *latent_shape) = {(n, *shape)}, row "
                         f"p * seeds_per_prompt + s holding prompt p's seed s; got {tuple(x.shape)}")  # fmt: skip
    if not bool(torch.isfinite(x).all()):
        raise ValueError("initial_noise holds NaN or infinite values")
    return x.to(device=device, dtype=torch.float32)


def prompt_major(batch_prompts: Sequence[str]) -> tuple[list[str], torch.Tensor]:
    """An official sampling batch (a prompt list with repeats in any order, e.g. what Flow-GRPO's
    ``DistributedKRepeatSampler`` hands a rank) in the engine's layout: ``(prompts, order)``, the distinct prompts
    in order of first appearance and the permutation with ``latents[order]`` prompt-major, the s-th occurrence of
    a prompt being its seed s. So ``rollout(model, prompts, reward, cfg, initial_noise=latents[order])`` starts
    every path from the latents the official call gave it. Every prompt must occur ``seeds_per_prompt`` times."""
    rows: dict[str, list[int]] = {}
    for i, p in enumerate(batch_prompts):
        rows.setdefault(p, []).append(i)
    counts = {len(v) for v in rows.values()}
    if len(counts) > 1:
        raise ValueError(f"every prompt must occur equally often (seeds_per_prompt times), got counts {sorted(counts)}")
    order = [i for v in rows.values() for i in v]
    return list(rows), torch.tensor(order, dtype=torch.long)


def score_paths(model, reward_fn, prompts, x, prompt_index, max_batch, metadata=None):
    """Decode and score finished latents in chunks of ``max_batch`` samples: ``(images, rewards, parts)``,
    ``parts`` the reward's named values (tempflow.rewards.score). Images are kept on the CPU (they are for logging;
    the rows keep latents)."""
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
    initial_noise: torch.Tensor | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    stats: dict | None = None,
) -> RolloutBatch:
    """Roll out ``config.plan`` for every prompt and seed; returns the rows as a :class:`RolloutBatch`.

    Args:
        model: a :class:`FlowModel` adapter, or a plain ``velocity_fn(x, t, cond_index) -> v`` (then give
            ``latent_shape``; rewards see the raw latents unless you wrap it in :class:`CallableModel`).
        prompt_ids: global prompt ids for the noise streams (default 0..N-1; ranks pass their global ids).
        initial_noise: the starting latents, ``(len(prompts) * seeds_per_prompt, *latent_shape)``, row
            ``p * seeds_per_prompt + s`` for prompt p's seed s (prompt-major, as diffusers lays out
            ``num_images_per_prompt``); e.g. the ``latents`` an official pipeline call started from.
        generator: instead, a ``torch.Generator`` (or a list, one per row) to draw them from exactly as the diffusers
            pipelines' ``prepare_latents`` does (``randn_tensor`` in the model's dtype, packed for FLUX; see
            :meth:`FlowModel.initial_latents`), in the same prompt-major order. With either, the deterministic
            main paths (and, with a trajectory plan, the path up to its first SDE step) follow from those latents;
            branch noise stays the counter-based stream. Default: the counter-based stream of (prompt id, seed).
        stats: filled with ``model_calls``, ``samples_forwarded``, ``largest_batch`` (rows of the largest forward, a
            CFG pair counting two: <= ``max_batch``, what bounds the forward's activation memory) and
            ``peak_live_items`` (latents held at once).
    """
    cfg, model, grid, table, pid_of = _setup(model, prompts, config, prompt_ids, latent_shape)
    plan = cfg.plan
    T, K = plan.num_steps, plan.K
    sde_steps = torch.zeros(T + 1, dtype=torch.bool)
    sde_steps[list(plan.sde_steps)] = True
    last_branch = max(plan.sde_steps)
    rows_per_item = model.forward_rows(cfg.guidance)
    chunk = model.samples_per_forward(cfg.max_batch, cfg.guidance)  # items per forward: max_batch rows at most
    x0 = start_latents(model, cfg, pid_of, initial_noise, generator, device=grid.device)
    cond = model.encode(list(prompts))
    n_prompts, S = len(prompts), cfg.seeds_per_prompt

    # live items: main paths (branch mode) or trajectories, then completions
    prompt = torch.arange(n_prompts).repeat_interleave(S)
    seed_idx = torch.arange(S).repeat(n_prompts)
    live = {
        "x": x0,
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
        for lo in range(0, x.shape[0], chunk):
            sl = slice(lo, lo + chunk)
            v[sl] = model.velocity(x[sl], grid.sigmas[step[sl]], cond, p[sl], cfg.guidance).float()
            calls += 1
            forwarded += x[sl].shape[0]
            largest = max(largest, x[sl].shape[0] * rows_per_item)
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
    images, rewards, parts = score_paths(model, reward_fn, list(prompts), fin["x"], fin["prompt"], chunk,
                                         metadata)  # fmt: skip
    fin_key = _path_key(plan, fin["prompt"], fin["seed"], fin["origin"], fin["branch"])
    if stats is not None:
        # peak memory: the rows of the largest forward (bounded by max_batch) and the latents held live at once
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
