"""The batched engine against the naive official-style loop: the same rows, at any cap, order and backend."""

import pytest
import torch

from tempflow import _ext
from tempflow.models import Conditioning, FlowModel, GaussianMixtureFlow
from tempflow.rollout import (
    BranchPlan,
    CallableModel,
    RolloutBatch,
    RolloutConfig,
    buckets,
    naive_rollout,
    prompt_major,
    rollout,
    start_latents,
)

FLOW = GaussianMixtureFlow.ring(4, 2.0, 0.3)
SHIFT = torch.tensor([[0.0, 0.0], [1.0, -1.0], [-2.0, 0.5]])
TARGET = torch.tensor([[2.0, 0.0], [0.0, 2.0], [-2.0, 0.0]])
PROMPTS = ["p0", "p1", "p2"]
FIELDS = ("prompt_index", "prompt_id", "seed_index", "step", "branch", "state", "action", "old_log_prob", "reward")


def velocity(x, t, index):
    """A prompt-conditioned exact flow velocity; every row is computed on its own, so batching cannot change it."""
    return FLOW.velocity(x - SHIFT[index] * (1 - t[:, None]), t)


def reward(images, prompts, metadata):
    index = torch.tensor([int(p[-1]) for p in prompts])
    return -((images - TARGET[index]) ** 2).sum(-1)


PLANS = {
    "tempflow": BranchPlan.tempflow(10, 6),
    "tempflow-subset": BranchPlan.tempflow(6, 3, branch_steps=[0, 2, 5]),
    "flow-grpo": BranchPlan.flow_grpo(10),
    "window": BranchPlan.window(8, 2, 3),
    # cheaper completions of the branches (issue 15): a sub-grid, second order, a budget per branch step
    "euler:2": BranchPlan.tempflow(10, 6, completion="euler:2"),
    "heun:2": BranchPlan.tempflow(10, 6, completion="heun:2"),
    "heun": BranchPlan.tempflow(6, 3, completion="heun"),
    "dpm2m:3": BranchPlan.tempflow(10, 6, completion="dpm2m:3"),
    "subset euler:3,1": BranchPlan.tempflow(6, 3, branch_steps=[0, 2, 4], completion="euler:3,1"),
    "x0": BranchPlan.tempflow(8, 2, completion="x0"),
}


def assert_same_rows(a: RolloutBatch, b: RolloutBatch, exact=True):
    assert len(a) == len(b) > 0
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        if exact or not x.is_floating_point():
            assert torch.equal(x, y), name
        else:
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("plan", list(PLANS.values()), ids=list(PLANS))
@pytest.mark.parametrize("cap,shuffle", [(1, None), (7, 3), (1000, None), (5, 11)])
def test_engine_equals_naive_loop_bit_for_bit(plan, cap, shuffle):
    cfg = RolloutConfig(plan=plan, seeds_per_prompt=2, max_batch=cap, shuffle=shuffle, backend="torch")
    stats, naive_stats = {}, {}
    fast = rollout(velocity, PROMPTS, reward, cfg, latent_shape=(2,), stats=stats)
    slow = naive_rollout(velocity, PROMPTS, reward, cfg, latent_shape=(2,), stats=naive_stats)
    assert_same_rows(fast, slow)
    seeds = len(PROMPTS) * cfg.seeds_per_prompt
    assert len(fast) == seeds * plan.rows_per_seed
    assert stats["samples_forwarded"] == seeds * plan.model_calls_per_seed()
    if cap >= 1000 and plan.completion.method == "euler":  # everything due fits one call: one call per tick
        assert stats["model_calls"] == plan.num_steps
    # the naive loop: one call per main-path step and per completion step (the K completions batched)
    if plan.mode == "branch":
        per_seed = max(plan.sde_steps) + 1 + sum(plan.completion_calls().values())
    else:
        per_seed = plan.num_steps
    assert naive_stats["model_calls"] == seeds * per_seed


def test_rewards_and_rows_mean_what_they_say():
    plan = BranchPlan.tempflow(10, 6)
    cfg = RolloutConfig(plan=plan, seeds_per_prompt=2, backend="torch")
    batch = rollout(velocity, PROMPTS, reward, cfg, latent_shape=(2,))
    # rows are (prompt, seed, step, branch)-sorted and cover every combination once
    key = ((batch.prompt_index * 2 + batch.seed_index) * 9 + batch.step) * 6 + batch.branch
    assert torch.equal(key, torch.arange(len(PROMPTS) * 2 * 9 * 6))
    # the K branches of a state share it; their actions differ
    grouped = batch.state.view(3, 2, 9, 6, 2)
    assert torch.equal(grouped, grouped[:, :, :, :1].expand_as(grouped))
    assert not torch.equal(batch.action.view(3, 2, 9, 6, 2)[..., 0, :], batch.action.view(3, 2, 9, 6, 2)[..., 1, :])
    assert batch.images.shape == (3 * 2 * 9 * 6, 2)


def test_results_do_not_depend_on_the_backend_beyond_the_last_bits():
    if not _ext.load("_C")[0]:
        pytest.skip("C++ extension not built")
    plan = BranchPlan.tempflow(6, 4)
    base = RolloutConfig(plan=plan, seeds_per_prompt=2, backend="torch")
    a = rollout(velocity, PROMPTS, reward, base, latent_shape=(2,))
    b = rollout(
        velocity, PROMPTS, reward, RolloutConfig(plan=plan, seeds_per_prompt=2, backend="cpu"), latent_shape=(2,)
    )
    assert_same_rows(a, b, exact=False)


def test_prompt_ids_shard_like_ranks():
    """Two ranks, each rolling out its prompts with their global ids, give the rows of one rank doing all."""
    cfg = RolloutConfig(plan=BranchPlan.tempflow(5, 3), seeds_per_prompt=2, backend="torch")
    whole = rollout(velocity, PROMPTS, reward, cfg, latent_shape=(2,))
    ids = torch.tensor([1, 2])  # the conditioning index is local to the rank's prompt list

    def local_velocity(x, t, index):
        return velocity(x, t, ids[index])

    part = rollout(local_velocity, PROMPTS[1:], reward, cfg, latent_shape=(2,), prompt_ids=ids)
    mask = whole.prompt_id >= 1
    for name in ("state", "action", "old_log_prob", "reward"):
        assert torch.equal(getattr(whole, name)[mask], getattr(part, name)), name
    assert torch.equal(whole.shard(0, 2).prompt_index.unique(), torch.tensor([0, 2]))


def test_batch_saves_and_loads(tmp_path):
    batch = rollout(velocity, PROMPTS, reward, RolloutConfig(plan=BranchPlan.flow_grpo(4), seeds_per_prompt=1),
                    latent_shape=(2,))  # fmt: skip
    batch.save(str(tmp_path / "b.pt"))
    again = RolloutBatch.load(str(tmp_path / "b.pt"))
    assert_same_rows(batch, again)


def test_engine_with_the_digits_model_matches_the_naive_loop():
    pytest.importorskip("diffusers")
    from tempflow.models import digits as dg
    from tempflow.rewards import DigitCorrectness

    model = dg.DigitsModel.load()
    prompts = [dg.prompt_for(3), dg.prompt_for(7)]
    cfg = RolloutConfig(plan=BranchPlan.tempflow(4, 3), seeds_per_prompt=2, max_batch=5)
    reward_fn = DigitCorrectness()
    fast = rollout(model, prompts, reward_fn, cfg)
    slow = naive_rollout(model, prompts, reward_fn, cfg)
    assert_same_rows(fast, slow, exact=False)  # a transformer's batched matmuls round differently per batch size
    assert fast.images.shape[1:] == (1, 16, 16) and ((fast.reward >= 0) & (fast.reward <= 1)).all()


class GuidedFlow(FlowModel):
    """``velocity`` above as a FlowModel whose classifier-free guidance doubles the forward (the base class's), with
    every forward's row count recorded."""

    latent_shape, shift, default_guidance = (2,), 3.0, 2.0

    def __init__(self):
        self.rows = []

    def encode(self, prompts):
        return Conditioning({"shift": SHIFT[: len(prompts)]}, {"shift": torch.zeros(1, 2)})

    def forward_velocity(self, x, t, cond):
        self.rows.append(x.shape[0])
        return FLOW.velocity(x - cond["shift"] * (1 - t[:, None]), t)

    def decode(self, latents):
        return latents


@pytest.mark.parametrize("guidance,cap", [(2.0, 8), (2.0, 5), (2.0, 2), (1.0, 5)])
def test_max_batch_counts_the_rows_of_a_forward_cfg_pairs_as_two(guidance, cap):
    model = GuidedFlow()
    cfg = RolloutConfig(plan=BranchPlan.tempflow(5, 3), seeds_per_prompt=2, guidance=guidance, max_batch=cap,
                        backend="torch")  # fmt: skip
    stats = {}
    fast = rollout(model, PROMPTS, reward, cfg, stats=stats)
    per_item = 2 if guidance != 1.0 else 1
    assert max(model.rows) == stats["largest_batch"] == (cap // per_item) * per_item <= cap
    assert sum(model.rows) == stats["samples_forwarded"] * per_item
    model.rows.clear()
    assert_same_rows(fast, naive_rollout(model, PROMPTS, reward, cfg), exact=True)  # rows are computed on their own
    assert max(model.rows) == 3 * per_item  # the naive loop: the K completions of one branch point together


def test_buckets():
    assert buckets(32) == (1, 2, 4, 8, 16, 32) and buckets(24) == (1, 2, 4, 8, 16, 24)
    assert buckets(1) == (1,) and buckets(2) == (1, 2) and buckets(7) == (1, 2, 4, 7)
    with pytest.raises(ValueError, match="cap >= 1"):
        buckets(0)
    with pytest.raises(ValueError, match="compile='fast'"):
        RolloutConfig(compile="fast")


@pytest.mark.parametrize("plan", list(PLANS.values()), ids=list(PLANS))
@pytest.mark.parametrize("cap,shuffle", [(1, None), (7, 3), (1000, None), (5, 11), (64, None)])
def test_bucketed_chunks_give_the_same_rows_bit_for_bit(plan, cap, shuffle):
    """Chunks from the buckets, the last one padded by repeating an item: the rows of the naive loop, bit for bit."""
    model = GuidedFlow()
    cfg = RolloutConfig(plan=plan, seeds_per_prompt=2, guidance=2.0, max_batch=2 * cap, shuffle=shuffle,
                        backend="torch", buckets=True)  # fmt: skip
    stats = {}
    fast = rollout(model, PROMPTS, reward, cfg, stats=stats)
    sizes = {r // 2 for r in model.rows}
    assert sizes <= set(buckets(cap)) and stats["largest_batch"] <= 2 * cap  # the cap counts the padding
    assert sum(model.rows) == 2 * (stats["samples_forwarded"] + stats["padded_samples"])
    assert stats["samples_forwarded"] == len(PROMPTS) * 2 * plan.model_calls_per_seed()  # padding not counted
    if cap == 1000:
        assert stats["padded_samples"] > 0
    plain = rollout(GuidedFlow(), PROMPTS, reward, RolloutConfig(**{**cfg.__dict__, "buckets": False}))
    assert_same_rows(fast, plain)
    assert_same_rows(fast, naive_rollout(GuidedFlow(), PROMPTS, reward, cfg))


def test_padding_does_not_change_the_transformers_rows_beyond_the_last_bits():
    """The digits and SD3 transformers compute each row on its own (eval mode): a chunk padded with repeats gives
    its rows to within 2e-6 of the unpadded forward (batched matmuls round differently per batch size), and a
    bucketed rollout the naive loop's rows within the tolerance of the unbucketed one."""
    pytest.importorskip("diffusers")
    import tempfile

    from tempflow.models import digits as dg
    from tempflow.models.diffusers_models import SD3Model
    from tempflow.models.tiny import sd3_pipeline

    digits = dg.DigitsModel.load()
    with tempfile.TemporaryDirectory() as tmp:
        sd3 = SD3Model.from_pipeline(sd3_pipeline(tmp), height=16, width=16)
    for model, prompts in ((digits, [dg.prompt_for(d) for d in range(10)]), (sd3, ["a fox", "two cats"])):
        cond = model.encode(prompts)
        with torch.no_grad():
            for n, size in ((1, 2), (3, 4), (5, 8), (20, 32), (40, 64)):
                g = torch.Generator().manual_seed(n)
                x, t = torch.randn(n, *model.latent_shape, generator=g), torch.rand(n, generator=g)
                rows = cond.select(torch.arange(n) % len(prompts))
                idx = torch.cat([torch.arange(n), torch.full((size - n,), n - 1)])
                alone = model.forward_velocity(x, t, rows)
                padded = model.forward_velocity(x[idx], t[idx], {k: v[idx] for k, v in rows.items()})[:n]
                torch.testing.assert_close(padded, alone, rtol=0, atol=2e-6)
    cfg = RolloutConfig(plan=BranchPlan.tempflow(4, 3), seeds_per_prompt=2, max_batch=10, buckets=True)
    from tempflow.rewards import DigitCorrectness

    prompts = [dg.prompt_for(3), dg.prompt_for(7)]
    assert_same_rows(rollout(digits, prompts, DigitCorrectness(), cfg),
                     naive_rollout(digits, prompts, DigitCorrectness(), cfg), exact=False)  # fmt: skip


def test_default_max_batch_is_the_official_largest_forward():
    assert RolloutConfig().max_batch == 48
    model = GuidedFlow()
    cfg = RolloutConfig(plan=BranchPlan.tempflow(10, 6), seeds_per_prompt=4, guidance=4.5, backend="torch")
    stats = {}
    rollout(model, PROMPTS, reward, cfg, stats=stats)
    assert max(model.rows) == stats["largest_batch"] == 48 and stats["peak_live_items"] > 24
    with pytest.raises(ValueError, match="cannot hold one sample"):
        rollout(model, PROMPTS, reward, RolloutConfig(plan=BranchPlan.tempflow(3, 2), guidance=2.0, max_batch=1))


@pytest.mark.parametrize("plan", [PLANS["tempflow"], PLANS["flow-grpo"]], ids=["tempflow", "flow-grpo"])
def test_given_initial_noise_equals_the_naive_loop_from_the_same_latents(plan):
    cfg = RolloutConfig(plan=plan, seeds_per_prompt=2, max_batch=7, shuffle=5, backend="torch")
    x0 = torch.randn(len(PROMPTS) * 2, 2, generator=torch.Generator().manual_seed(3))
    fast = rollout(velocity, PROMPTS, reward, cfg, latent_shape=(2,), initial_noise=x0)
    slow = naive_rollout(velocity, PROMPTS, reward, cfg, latent_shape=(2,), initial_noise=x0)
    assert_same_rows(fast, slow)
    first = (fast.step == 0) & (fast.branch == 0)  # prompt-major: row p * seeds + s is prompt p's seed s
    assert torch.equal(fast.state[first], x0)
    if plan.mode == "branch":  # the deterministic main path from those latents, step by step
        grid = CallableModel(velocity, (2,)).time_grid(plan.num_steps)
        x, index = x0.clone(), torch.arange(len(PROMPTS)).repeat_interleave(2)
        from tempflow import sde

        for k in range(plan.num_steps - 1):
            assert torch.equal(fast.state[(fast.step == k) & (fast.branch == 0)], x), k
            x = sde.ode_step(x, velocity(x, grid.sigmas[k].expand(x.shape[0]), index).float(), k, grid)
    default = rollout(velocity, PROMPTS, reward, cfg, latent_shape=(2,))
    assert not torch.equal(default.state, fast.state)
    counter = start_latents(CallableModel(velocity, (2,)), cfg, torch.arange(3))
    assert_same_rows(default, rollout(velocity, PROMPTS, reward, cfg, latent_shape=(2,), initial_noise=counter))


def test_a_generator_draws_the_latents_as_the_diffusers_pipelines_do():
    from tempflow.models.base import randn_like_diffusers, randn_tensor

    model = GuidedFlow()
    cfg = RolloutConfig(plan=BranchPlan.tempflow(4, 2), seeds_per_prompt=2, guidance=2.0, backend="torch")
    batch = rollout(model, PROMPTS, reward, cfg, generator=torch.Generator().manual_seed(7))
    drawn = randn_tensor((6, 2), generator=torch.Generator().manual_seed(7), device="cpu", dtype=torch.float32)
    assert torch.equal(batch.state[(batch.step == 0) & (batch.branch == 0)], drawn)
    per_row = [torch.Generator().manual_seed(i) for i in range(6)]  # Flow-GRPO's create_generator: one per row
    again = naive_rollout(model, PROMPTS, reward, cfg, generator=[torch.Generator().manual_seed(i) for i in range(6)])
    assert torch.equal(again.state[(again.step == 0) & (again.branch == 0)],
                       torch.cat([torch.randn(1, 2, generator=g) for g in per_row]))  # fmt: skip
    reference = pytest.importorskip("diffusers.utils.torch_utils").randn_tensor
    for gen in (torch.Generator().manual_seed(7), [torch.Generator().manual_seed(i) for i in range(6)]):
        mine = randn_like_diffusers((6, 2), generator=gen, device="cpu", dtype=torch.bfloat16)  # without diffusers
        gen = gen.manual_seed(7) if isinstance(gen, torch.Generator) else [g.manual_seed(i) for i, g in enumerate(gen)]
        assert torch.equal(mine, reference((6, 2), generator=gen, device="cpu", dtype=torch.bfloat16))


def test_an_official_batch_maps_to_the_prompt_major_layout():
    batch_prompts = ["p1", "p0", "p1", "p2", "p0", "p2"]  # a shuffled K-repeat batch, 2 images per prompt
    latents = torch.arange(6.0)[:, None].expand(6, 2)
    prompts, order = prompt_major(batch_prompts)
    assert prompts == ["p1", "p0", "p2"] and torch.equal(order, torch.tensor([0, 2, 1, 4, 3, 5]))
    cfg = RolloutConfig(plan=BranchPlan.tempflow(3, 2), seeds_per_prompt=2, backend="torch")
    out = rollout(velocity, prompts, reward, cfg, latent_shape=(2,), initial_noise=latents[order])
    first = (out.step == 0) & (out.branch == 0)
    assert [batch_prompts[int(i)] for i in out.state[first][:, 0]] == [prompts[i] for i in out.prompt_index[first]]
    with pytest.raises(ValueError, match="equally often"):
        prompt_major(["a", "a", "b"])


def test_bad_input():
    with pytest.raises(ValueError, match="latent_shape"):
        rollout(velocity, PROMPTS, reward)
    with pytest.raises(ValueError, match="distinct and within"):
        BranchPlan.tempflow(5, 2, branch_steps=[0, 5])
    with pytest.raises(ValueError, match="one id per prompt"):
        rollout(velocity, PROMPTS, reward, latent_shape=(2,), prompt_ids=torch.tensor([0, 1]))
    cfg = RolloutConfig(plan=BranchPlan.tempflow(3, 2), seeds_per_prompt=2)
    with pytest.raises(ValueError, match=r"initial_noise must be .*\(6, 2\)"):
        rollout(velocity, PROMPTS, reward, cfg, latent_shape=(2,), initial_noise=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="not both"):
        rollout(velocity, PROMPTS, reward, cfg, latent_shape=(2,), initial_noise=torch.zeros(6, 2),
                generator=torch.Generator())  # fmt: skip
    with pytest.raises(ValueError, match="one per latent"):
        rollout(velocity, PROMPTS, reward, cfg, latent_shape=(2,), generator=[torch.Generator()] * 5)
    from tempflow.rewards import RewardError

    with pytest.raises(RewardError, match="'bad' returned shape"):

        def bad(images, prompts, metadata):
            return torch.zeros(1)

        rollout(CallableModel(velocity, (2,)), PROMPTS, bad, RolloutConfig(plan=BranchPlan.flow_grpo(2)))
