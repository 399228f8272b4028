"""The batched engine against the naive official-style loop: the same rows, at any cap, order and backend."""

import pytest
import torch

from tempflow import _ext
from tempflow.models import GaussianMixtureFlow
from tempflow.rollout import BranchPlan, CallableModel, RolloutBatch, RolloutConfig, naive_rollout, rollout

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
    if cap >= 1000:  # everything due fits one call: one call per tick
        assert stats["model_calls"] == plan.num_steps
    # the naive loop: one call per main-path step and per completion step (the K completions batched)
    if plan.mode == "branch":
        per_seed = max(plan.sde_steps) + 1 + sum(plan.num_steps - 1 - k for k in plan.sde_steps)
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


def test_bad_input():
    with pytest.raises(ValueError, match="latent_shape"):
        rollout(velocity, PROMPTS, reward)
    with pytest.raises(ValueError, match="distinct and within"):
        BranchPlan.tempflow(5, 2, branch_steps=[0, 5])
    with pytest.raises(ValueError, match="one id per prompt"):
        rollout(velocity, PROMPTS, reward, latent_shape=(2,), prompt_ids=torch.tensor([0, 1]))
    from tempflow.rewards import RewardError

    with pytest.raises(RewardError, match="'bad' returned shape"):

        def bad(images, prompts, metadata):
            return torch.zeros(1)

        rollout(CallableModel(velocity, (2,)), PROMPTS, bad, RolloutConfig(plan=BranchPlan.flow_grpo(2)))
