import numpy as np
import pytest
import torch

from tempflow.rollout import RolloutBatch
from tempflow.train import flow_grpo_advantages, group_normalize, signal_rows, tempflow_advantages


def make_batch(P=2, S=3, steps=(0, 1, 2), K=4, reward=None, seed=0):
    grid = torch.tensor([[p, s, k, j] for p in range(P) for s in range(S) for k in steps for j in range(K)])
    n = len(grid)
    g = torch.Generator().manual_seed(seed)
    r = torch.rand(n, generator=g) if reward is None else reward
    z = torch.zeros(n, 2)
    return RolloutBatch([f"p{p}" for p in range(P)], grid[:, 0], grid[:, 0] + 10, grid[:, 1], grid[:, 2], grid[:, 3],
                        z, z, torch.zeros(n), r, torch.zeros(0, 1, 2, 2), torch.zeros(0, dtype=torch.long))  # fmt: skip


def manual(values, eps=1e-4, clip=5.0):
    v = np.asarray(values, dtype=np.float64)
    return np.clip((v - v.mean()) / (v.std() + eps), -clip, clip)


def test_seed_group_normalises_the_k_branches_of_each_state():
    b = make_batch()
    adv = tempflow_advantages(b, "seed")
    for p in range(2):
        for s in range(3):
            for k in range(3):
                m = (b.prompt_index == p) & (b.seed_index == s) & (b.step == k)
                np.testing.assert_allclose(adv[m].numpy(), manual(b.reward[m].numpy()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("group", ["prompt", "global"])
def test_prompt_and_global_groups(group):
    b = make_batch()
    adv = tempflow_advantages(b, group)
    for k in range(3):
        for p in range(2) if group == "prompt" else [None]:
            m = (b.step == k) & ((b.prompt_index == p) if p is not None else True)
            np.testing.assert_allclose(adv[m].numpy(), manual(b.reward[m].numpy()), rtol=1e-5, atol=1e-6)


def test_flow_grpo_baseline():
    # one reward per trajectory, broadcast to its steps; mean per prompt, std global (or per prompt)
    traj_reward = torch.rand(2 * 3, generator=torch.Generator().manual_seed(1))
    per_row = traj_reward.repeat_interleave(3)
    b = make_batch(K=1, reward=per_row)
    adv = flow_grpo_advantages(b, std="global")
    r = traj_reward.numpy().reshape(2, 3)
    expected = np.clip((r - r.mean(1, keepdims=True)) / (r.std() + 1e-4), -5, 5).reshape(-1)
    np.testing.assert_allclose(adv.view(6, 3)[:, 0].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(adv.view(6, 3), adv.view(6, 3)[:, :1].expand(6, 3))  # the same at every step
    per_prompt = flow_grpo_advantages(b, std="prompt").view(6, 3)[:, 0].numpy().reshape(2, 3)
    np.testing.assert_allclose(per_prompt, np.stack([manual(row) for row in r]), rtol=1e-5, atol=1e-6)


def test_clipping_and_rows_without_signal():
    reward = torch.zeros(2 * 3 * 3 * 4)
    reward[::8] = 1.0  # a few states have one rewarded branch; the others are all equal
    b = make_batch(reward=reward)
    adv = tempflow_advantages(b)
    assert adv.abs().max() <= 5.0
    keep = signal_rows(b, adv)
    states_with_signal = {(int(p), int(s), int(k)) for p, s, k, r in zip(b.prompt_index, b.seed_index, b.step, reward,
                                                                          strict=True) if r > 0}  # fmt: skip
    for i in range(len(b)):
        key = (int(b.prompt_index[i]), int(b.seed_index[i]), int(b.step[i]))
        assert bool(keep[i]) == (key in states_with_signal)
    outlier = torch.zeros(100)
    outlier[0] = 1.0  # (1 - 0.01) / (0.0995 + 1e-4) = 9.9 before clipping
    clipped = group_normalize(outlier, torch.zeros(100, dtype=torch.long))
    assert clipped[0] == 5.0 and clipped[1] == pytest.approx(-0.01 / (0.0994987 + 1e-4), rel=1e-4)


def test_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        group_normalize(torch.tensor([1.0, float("nan")]), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="seed, prompt or global"):
        tempflow_advantages(make_batch(), "branch")
    with pytest.raises(ValueError, match="global or prompt"):
        flow_grpo_advantages(make_batch(), "seed")
