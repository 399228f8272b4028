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

``RolloutConfig(compile=True)`` compiles the denoiser's forward with ``torch.compile`` (:func:`compile_model`): one
graph whose batch dimension is dynamic, so the varying number of live items never recompiles it. With
``compile="static"`` (one graph per batch size, what CUDA graphs need) or ``buckets=True`` the chunks take their sizes
from a few fixed :func:`buckets` (powers of two up to the cap): the last chunk of a tick is padded by repeating its
last item and the padding's outputs are dropped, so the rows do not change (the models' rows are computed on their
own, up to the last bits of their batched arithmetic).
"""

from __future__ import annotations

import time
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

__all__ = ["RolloutConfig", "CallableModel", "rollout", "start_latents", "prompt_major", "buckets", "compile_model",
           "compile_stats"]  # fmt: skip


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
    model's batched arithmetic.

    ``compile``: False (eager), True (``torch.compile`` of the denoiser's forward with a dynamic batch dimension: one
    graph for every chunk size) or ``"static"`` (one graph per batch size, the chunks padded to :func:`buckets`); see
    :func:`compile_model`. ``buckets``: chunk sizes from :func:`buckets` (the last chunk of a tick padded, the
    padding's outputs dropped); None: only with ``compile="static"``."""

    plan: BranchPlan = field(default_factory=BranchPlan.tempflow)
    seeds_per_prompt: int = 4
    guidance: float | None = None
    noise_level: float = 0.7
    schedule: str = "flow-grpo"
    seed: int = 0
    max_batch: int = 48  # rows per forward, a CFG pair counting two
    shuffle: int | None = None  # permute the live items each tick with this seed (tests order invariance)
    backend: str | None = None
    compile: bool | str = False  # False | True (dynamic batch dimension) | "static" (a graph per bucket)
    buckets: bool | None = None  # chunk sizes from buckets(); None: with compile="static"

    def __post_init__(self):
        _compile_kind(self.compile)  # refuse an unknown value at once


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


def buckets(cap: int) -> tuple[int, ...]:
    """The batch sizes a bucketed rollout forwards: the powers of two below ``cap``, and ``cap`` (``buckets(32)`` is
    ``(1, 2, 4, 8, 16, 32)``, ``buckets(24)`` is ``(1, 2, 4, 8, 16, 24)``): log2(cap) + 1 shapes at most, whatever
    the number of live items, and a padded chunk is less than twice its items."""
    cap = int(cap)
    if cap < 1:
        raise ValueError(f"buckets need a cap >= 1, got {cap}")
    return (*(1 << i for i in range(cap.bit_length()) if 1 << i < cap), cap)


def _bucket(n: int, sizes: tuple[int, ...] | None) -> int:
    """The smallest bucket that holds ``n`` items (``n`` itself without buckets or beyond the largest)."""
    if not sizes:
        return n
    return next((b for b in sizes if b >= n), n)


def _compile_kind(value) -> str | None:
    """``RolloutConfig.compile`` as None (eager), ``"dynamic"`` or ``"static"``."""
    if value is None or value is False:
        return None
    if value is True or value == "dynamic":
        return "dynamic"
    if value == "static":
        return "static"
    raise ValueError(f"compile={value!r}: choose False, True (a dynamic batch dimension) or 'static'")


@dataclass
class _Compiled:
    """What :func:`compile_model` keeps on the model (``model._tempflow_compiled``)."""

    kind: str
    max_rows: int | None
    backend: str
    name: str  # the patched attribute: forward_velocity (adapters) or velocity_fn (CallableModel)
    eager: Callable
    calls: int = 0  # forwards through the compiled graph
    eager_calls: int = 0  # forwards with gradients (training), run eagerly
    padded_rows: int = 0
    shapes: set = field(default_factory=set)  # batch sizes (rows) the compiled graph was called with
    graphs: int = 0  # graphs compiled for this model (dynamo's unique graphs counted around its calls)
    compiles: int = 0  # calls that compiled (the first one, then each recompilation)
    compile_s: float = 0.0  # wall time of the calls that compiled a graph (the compile and that one forward)


def _batch_tensors(obj, n: int):
    """Every tensor in ``obj`` (nested tuples, lists and dicts) whose first dimension is the batch ``n``."""
    if isinstance(obj, torch.Tensor):
        return [obj] if obj.dim() and obj.shape[0] == n else []
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _batch_tensors(o, n)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _batch_tensors(o, n)]
    return []


def _pad(obj, n: int, index: torch.Tensor):
    """``obj`` with every batch tensor (first dimension ``n``) gathered by ``index`` (its rows, then repeats)."""
    if isinstance(obj, torch.Tensor):
        return obj.index_select(0, index.to(obj.device)) if obj.dim() and obj.shape[0] == n else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_pad(o, n, index) for o in obj)
    if isinstance(obj, dict):
        return {k: _pad(o, n, index) for k, o in obj.items()}
    return obj


def compile_model(model, compile: bool | str = True, max_rows: int | None = None, backend: str = "inductor"):
    """Compile the denoiser's forward of ``model`` with ``torch.compile`` (inductor), in place and once; returns it.

    The adapter's :meth:`~tempflow.models.FlowModel.forward_velocity` (a :class:`CallableModel`'s ``velocity_fn``)
    is replaced by a wrapper: forwards without gradients (rollouts, evaluation, sampling, the KL reference) go through
    the compiled graph, the training forward (with gradients) stays eager. Weights are inputs of the graph, so
    optimizer steps and LoRA updates need no recompilation; turning the LoRA adapters off (``model.reference()``)
    compiles a second graph once.

    ``compile``: True or ``"dynamic"``: the batch dimension of every input is marked dynamic, so one graph serves
    every batch size (a batch of one row is padded to two, which a dynamic dimension needs); ``"static"``: one
    graph per batch size, the rows padded up to :func:`buckets` of ``max_rows`` (the padding's outputs dropped), so a
    run compiles at most log2(max_rows) + 1 shapes (CUDA graphs record one graph per shape in the same way).
    Compiled graphs are cached on disk by inductor (``TORCHINDUCTOR_CACHE_DIR``, default
    ``/tmp/torchinductor_<user>``), so a second process compiles the same graphs in a fraction of the time.
    ``backend``: torch.compile's (``"eager"`` traces without generating code: a quick check of the graph and its
    guards). Calling it again with the same settings does nothing; :func:`compile_stats` reads the counts. A plain
    velocity function handed to :func:`rollout` is wrapped anew at each call: wrap it in a :class:`CallableModel`
    once and pass that, so that it is compiled once."""
    kind = _compile_kind(compile)
    state = getattr(model, "_tempflow_compiled", None)
    if kind is None:
        return model
    if state is not None:
        if (state.kind, state.max_rows, state.backend) == (kind, max_rows, backend):
            return model
        setattr(model, state.name, state.eager)  # recompile with the new settings from the eager forward
    name = "velocity_fn" if isinstance(model, CallableModel) else "forward_velocity"
    eager = getattr(model, name)
    state = _Compiled(kind, max_rows, backend, name, eager)
    sizes = buckets(max_rows) if kind == "static" and max_rows else None
    if kind == "static":
        from torch._dynamo import config as dynamo_config

        # one graph per bucket, and again with LoRA adapters off (the KL reference); dynamo's default limit is 8
        limit = 2 * len(sizes or ()) + 4
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, limit)
    compiled = torch.compile(eager, dynamic=False if kind == "static" else None, backend=backend)

    def forward(*args, **kwargs):
        if torch.is_grad_enabled():
            state.eager_calls += 1
            return eager(*args, **kwargs)
        n = args[0].shape[0]
        size = max(2, n) if kind == "dynamic" else _bucket(n, sizes)
        if size > n:
            index = torch.cat([torch.arange(n), torch.full((size - n,), n - 1)])
            args, kwargs = _pad(args, n, index), _pad(kwargs, n, index)
            state.padded_rows += size - n
        if kind == "dynamic":
            for t in _batch_tensors((args, kwargs), size):
                torch._dynamo.maybe_mark_dynamic(t, 0)
        graphs = _unique_graphs()
        start = time.perf_counter()
        out = compiled(*args, **kwargs)
        new = _unique_graphs() - graphs
        if new:
            state.graphs += new
            state.compiles += 1
            state.compile_s += time.perf_counter() - start
        state.calls += 1
        state.shapes.add(size)
        return out[:n] if size > n else out

    setattr(model, name, forward)
    model._tempflow_compiled = state
    return model


def _unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def compile_stats(model=None) -> dict:
    """How compilation went. ``graphs``: graphs dynamo compiled in this process (every compiled function). For a model
    given to :func:`compile_model` also: ``calls`` through the compiled graph, ``eager_calls`` (forwards with
    gradients), ``compiles`` (calls that compiled a graph: the first, then one per recompilation), ``recompiles``
    (``compiles`` - 1), ``model_graphs``, ``compile_s`` (wall time of the calls that compiled, their forward
    included), ``shapes`` (the batch sizes, in rows, the graph was called with) and ``padded_rows``."""
    out = {"graphs": _unique_graphs()}
    state = getattr(model, "_tempflow_compiled", None)
    if state is not None:
        out.update(kind=state.kind, calls=state.calls, eager_calls=state.eager_calls, compiles=state.compiles,
                   recompiles=max(0, state.compiles - 1), model_graphs=state.graphs, compile_s=state.compile_s,
                   shapes=sorted(state.shapes), padded_rows=state.padded_rows)  # fmt: skip
    return out


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
            CFG pair counting two: <= ``max_batch``, what bounds the forward's activation memory; padding included),
            ``peak_live_items`` (latents held at once) and ``padded_samples`` (items repeated to fill buckets).
    """
    cfg, model, grid, table, pid_of = _setup(model, prompts, config, prompt_ids, latent_shape)
    plan = cfg.plan
    T, K = plan.num_steps, plan.K
    sde_steps = torch.zeros(T + 1, dtype=torch.bool)
    sde_steps[list(plan.sde_steps)] = True
    last_branch = max(plan.sde_steps)
    rows_per_item = model.forward_rows(cfg.guidance)
    chunk = model.samples_per_forward(cfg.max_batch, cfg.guidance)  # items per forward: max_batch rows at most
    if cfg.compile and getattr(model, "_tempflow_compiled", None) is None:  # a compiled model keeps its settings
        compile_model(model, cfg.compile, cfg.max_batch)
    bucketed = cfg.buckets if cfg.buckets is not None else _compile_kind(cfg.compile) == "static"
    sizes = buckets(chunk) if bucketed else None
    x0 = start_latents(model, cfg, pid_of, initial_noise, generator, device=grid.device)
    cond = model.encode(list(prompts))
    n_prompts, S = len(prompts), cfg.seeds_per_prompt
    method = plan.completion.method
    # the grid index after each point: row k for a completion from branch step k, the last row (origin -1) for
    # main paths and trajectories (every step)
    next_of = torch.arange(1, T + 2).repeat(T + 1, 1)
    for k, route in plan.routes().items() if plan.mode == "branch" else ():
        next_of[k, list(route[:-1])] = torch.tensor(route[1:], dtype=torch.long)

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
        # completions by heun / dpm2m: stage (heun: 1 = the predictor is in x; dpm2m: 1 = d_prev holds the previous
        # data prediction), prev (heun: the interval's start; dpm2m: the previous point), and the saved tensors
        "stage": torch.zeros(n_prompts * S, dtype=torch.long),
        "prev": torch.zeros(n_prompts * S, dtype=torch.long),
    }
    if method != "euler":
        live["xa"] = torch.zeros_like(x0)  # heun: the interval's start
        live["va"] = torch.zeros_like(x0)  # heun: its velocity; dpm2m: the previous data prediction
    rows = _Rows()
    finished = {k: [] for k in ("x", "prompt", "seed", "origin", "branch")}
    calls = forwarded = peak_live = largest = padded = 0
    gen = torch.Generator().manual_seed(cfg.shuffle) if cfg.shuffle is not None else None
    while live["x"].shape[0]:
        if gen is not None:
            perm = torch.randperm(live["x"].shape[0], generator=gen)
            live = {k: v[perm] for k, v in live.items()}
        x, step, p = live["x"], live["step"], live["prompt"]
        peak_live = max(peak_live, x.shape[0])
        v = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        for lo in range(0, x.shape[0], chunk):
            hi = min(lo + chunk, x.shape[0])
            size = _bucket(hi - lo, sizes)
            if size > hi - lo:  # the last chunk, padded to its bucket by repeating its last item; outputs dropped
                idx = torch.cat([torch.arange(lo, hi), torch.full((size - (hi - lo),), hi - 1)])
                xs, ts, ps = x[idx.to(x.device)], step[idx], p[idx]
            else:
                xs, ts, ps = x[lo:hi], step[lo:hi], p[lo:hi]
            v[lo:hi] = model.velocity(xs, grid.sigmas[ts], cond, ps, cfg.guidance)[: hi - lo].float()
            calls += 1
            forwarded += hi - lo
            padded += size - (hi - lo)
            largest = max(largest, size * rows_per_item)
        x_next, step_next = _advance(live, x, v, step, next_of, grid, method, T)
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
                    "stage": torch.zeros(n * K, dtype=torch.long),
                    "prev": torch.zeros(n * K, dtype=torch.long),
                }
                for name in ("xa", "va"):
                    if name in live:
                        new_items[name] = torch.zeros_like(new_items["x"])
            else:
                x_next[idx] = out.samples[:, 0]
        live["x"], live["step"] = x_next, step_next
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
        stats.update(model_calls=calls, samples_forwarded=forwarded, largest_batch=largest, peak_live_items=peak_live,
                     padded_samples=padded)  # fmt: skip
    return _assemble(rows, list(prompts), fin_key, rewards, images, fin["prompt"], parts)


def _advance(live: dict, x, v, step, next_of, grid, method: str, T: int):
    """One tick's deterministic update of every live item given its velocity: the Euler step to the next point of
    its route (main paths and trajectories: ``step + 1``), or for completions by ``heun`` / ``dpm2m`` their
    solver's step (docs/ALGORITHM.md section 3). Returns ``(x_next, step_next)``; updates the solver state in
    ``live`` in place. The naive loop's :func:`~tempflow.rollout.naive.complete` does the same per branch."""
    to = next_of[live["origin"], step.clamp(max=T)]
    x_next = sde.ode_step(x, v, step, grid, to=to)
    if method == "euler":
        return x_next, to
    comp = ~live["main"]
    stage, prev, xa, va = live["stage"], live["prev"], live["xa"], live["va"]
    step_next = to.clone()
    if method == "heun":
        predict = comp & (stage == 0) & (to < T)  # Euler predictor now, corrector at the interval's end next tick
        correct = comp & (stage == 1)
        if bool(correct.any()):
            i = torch.nonzero(correct).flatten()
            x_next[i] = sde.heun_step(xa[i], va[i], v[i], prev[i], step[i], grid)
            step_next[i] = step[i]
            stage[i] = 0
        if bool(predict.any()):
            i = torch.nonzero(predict).flatten()
            xa[i], va[i], prev[i], stage[i] = x[i].float(), v[i], step[i], 1
        return x_next, step_next
    # dpm2m: second order where a previous data prediction exists and the interval does not end at t = 0
    second = comp & (stage == 1) & (to < T)
    if bool(second.any()):
        i = torch.nonzero(second).flatten()
        x_next[i] = sde.dpm2m_step(x[i], v[i], va[i], step[i], to[i], prev[i], grid)
    if bool(comp.any()):
        i = torch.nonzero(comp).flatten()
        va[i], prev[i], stage[i] = sde.data_prediction(x[i], v[i], step[i], grid), step[i], 1
    return x_next, step_next


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
