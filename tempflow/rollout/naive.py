"""The naive reference loop, in the structure of the official TempFlow-GRPO code: per prompt, per seed, per step one
forward of the main path; at a branch step K one-step SDE branches, then a sequential ODE loop that completes the K
branches (as one batch), decode, score. Flow-GRPO plans: one sequential trajectory per seed. It uses the pure-torch
reference step and the same counter-based noise as the engine, so the two give the same rows; the engine is the fast
one. Used by the tests and by bench/bench_rollout.py."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .. import rng, sde
from ..models.base import FlowModel
from .batch import RolloutBatch
from .engine import RolloutConfig, _assemble, _path_key, _Rows, _setup, score_paths, start_latents
from .keys import noise_keys

__all__ = ["naive_rollout", "complete"]


def complete(x: torch.Tensor, route, forward: Callable, method: str, grid) -> torch.Tensor:
    """Carry branch samples ``x`` (at grid point ``route[0]``) along ``route`` to t = 0 (docs/ALGORITHM.md section
    3): ``forward(x, m)`` is the velocity at grid point m; ``method`` ``euler`` | ``heun`` | ``dpm2m``
    (:class:`~tempflow.rollout.plan.Completion`). The engine's tick-wise ``_advance`` does the same per item."""
    T = route[-1]
    d_prev = prev = None
    for a, b in zip(route[:-1], route[1:], strict=True):
        v = forward(x, a)
        if method == "heun" and b < T:
            v_end = forward(sde.ode_step(x, v, a, grid, to=b), b)
            x = sde.heun_step(x, v, v_end, a, b, grid)
        elif method == "dpm2m" and d_prev is not None and b < T:
            x, d_prev, prev = sde.dpm2m_step(x, v, d_prev, a, b, prev, grid), sde.data_prediction(x, v, a, grid), a
        else:
            if method == "dpm2m":
                d_prev, prev = sde.data_prediction(x, v, a, grid), a
            x = sde.ode_step(x, v, a, grid, to=b)
    return x


@torch.no_grad()
def naive_rollout(
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
    """Same arguments and result as :func:`tempflow.rollout.rollout` (``initial_noise`` / ``generator`` too: the
    latents of prompt p's seed s are row ``p * seeds_per_prompt + s``). One forward per main-path step of one seed,
    and one per completion step of its K branches together, as the official code does (``max_batch``, ``buckets``
    and ``compile`` are not used: a model that :func:`~tempflow.rollout.compile_model` compiled stays compiled;
    ``stats["largest_batch"]`` counts the rows, a CFG pair being two)."""
    cfg, model, grid, table, pid_of = _setup(model, prompts, config, prompt_ids, latent_shape)
    plan, T, K = cfg.plan, cfg.plan.num_steps, cfg.plan.K
    shape = tuple(model.latent_shape)
    rows = _Rows()
    done = {"key": [], "reward": [], "image": [], "prompt": [], "parts": []}
    calls = largest = 0
    rows_per_item = model.forward_rows(cfg.guidance)
    x0 = start_latents(model, cfg, pid_of, initial_noise, generator, device=grid.device)
    cond = model.encode(list(prompts))

    def finish(x, pi, s, origin, branch):
        """Decode and score finished paths at once, as the official loop does after each branch point."""
        n = x.shape[0]
        images, rewards, parts = score_paths(model, reward_fn, list(prompts), x, torch.full((n,), pi), n, metadata)
        full = torch.full((n,), 0)
        done["key"].append(_path_key(plan, full + pi, full + s, full + origin, branch))
        done["reward"].append(rewards)
        done["parts"].append(parts)
        done["image"].append(images)
        done["prompt"].append(full + pi)

    def forward(x, k, pi):
        nonlocal calls, largest
        calls += 1
        largest = max(largest, x.shape[0] * rows_per_item)
        index = torch.full((x.shape[0],), pi, dtype=torch.long)
        return model.velocity(x, grid.sigmas[k], cond, index, cfg.guidance).float()

    for pi in range(len(prompts)):
        pid = pid_of[pi : pi + 1]
        for s in range(cfg.seeds_per_prompt):
            sid = torch.tensor([s])
            x = x0[pi * cfg.seeds_per_prompt + s][None]
            for k in range(T):
                if plan.mode == "branch" and k > max(plan.sde_steps):
                    break
                v = forward(x, k, pi)
                if k in plan.sde_steps:
                    k_s = K if plan.mode == "branch" else 1
                    keys = noise_keys(cfg.seed, pid, sid, torch.tensor([k]), k_s)[0]
                    noise = rng.normal_from_keys(keys, shape).to(x.device)
                    outs = [sde.sde_step(x, v, k, table, noise=eps[None], check_finite=False) for eps in noise]
                    actions = torch.cat([o.sample for o in outs])
                    full = torch.full((k_s,), 0)
                    rows.add(prompt=full + pi, pid=pid.expand(k_s), seed=full + s, step=full + k,
                             branch=torch.arange(k_s), state=x.expand(k_s, *shape), action=actions,
                             logp=torch.cat([o.log_prob for o in outs]),
                             path=_path_key(plan, full + pi, full + s, full + k, torch.arange(k_s)))  # fmt: skip
                    if plan.mode == "branch":  # complete the K branches together, one step after another
                        route = plan.routes()[k]
                        xc = complete(
                            actions, route, lambda x, m, pi=pi: forward(x, m, pi), plan.completion.method, grid
                        )
                        finish(xc, pi, s, k, torch.arange(K))
                        x = sde.ode_step(x, v, k, grid)
                    else:
                        x = actions
                else:
                    x = sde.ode_step(x, v, k, grid)
            if plan.mode == "trajectory":
                finish(x, pi, s, -1, torch.zeros(1, dtype=torch.long))
    if stats is not None:  # live at once: the main path and the K completions of one branch point
        live = K + 1 if plan.mode == "branch" else 1
        stats.update(model_calls=calls, samples_forwarded=None, largest_batch=largest, peak_live_items=live)
    named = done.pop("parts")
    parts = {k: torch.cat([p[k] for p in named]) for k in named[0]}
    cat = {k: torch.cat(v) for k, v in done.items()}
    return _assemble(rows, list(prompts), cat["key"], cat["reward"], cat["image"], cat["prompt"], parts)
