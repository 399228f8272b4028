"""Cheaper completions of TempFlow-GRPO's branches (the ``completion`` setting; docs/ALGORITHM.md section 3).

The engine and the naive loop agree row for row for every completion (tests/test_rollout.py's PLANS); here: the
text form and its errors, the call counts by formula, exactness of Euler at full M, the order of each solver on a
flow whose ODE we can solve finely, and the setting in TrainConfig and the trainer.
"""

import dataclasses

import pytest
import torch

from tempflow import sde
from tempflow.models import GaussianMixtureFlow
from tempflow.rollout import BranchPlan, RolloutConfig, naive_rollout, rollout
from tempflow.rollout.naive import complete
from tempflow.rollout.plan import Completion
from tempflow.train import SettingError, TrainConfig

FLOW = GaussianMixtureFlow.ring(4, 2.0, 0.3)
SHIFT = torch.tensor([[0.0, 0.0], [1.0, -1.0], [-2.0, 0.5]])
PROMPTS = ["p0", "p1", "p2"]


def velocity(x, t, index):
    return FLOW.velocity(x - SHIFT[index] * (1 - t[:, None]), t)


def reward(images, prompts, metadata):
    return -(images**2).sum(-1)


def test_text_form_and_errors():
    assert str(Completion.parse("euler")) == "euler" and Completion.parse("euler").exact
    assert Completion.parse("x0") == Completion("euler", (1,)) and str(Completion.parse("X0")) == "euler:1"
    assert str(Completion.parse(" heun:2 ")) == "heun:2" and str(Completion.parse("euler:3,2,1")) == "euler:3,2,1"
    assert Completion("dpm2m", 3).steps == (3,)
    for bad, match in (("rk4", "euler, heun or dpm2m"), ("euler:0", "M must be >= 1"), ("euler:2.5", "whole numbers"),
                       ("heun:", None)):  # fmt: skip
        if match is None:
            assert Completion.parse(bad) == Completion("heun")
            continue
        with pytest.raises(ValueError, match=match):
            Completion.parse(bad)
    with pytest.raises(ValueError, match="needs a branch plan"):
        BranchPlan(10, "trajectory", (0, 1), 1, "euler:2")


def test_calls_by_formula():
    """Completion forwards per branch summed over the 9 branch steps of T = 10 (issue 15's table): exact 45, at most
    1 step 9, 2 steps 17, 3 steps 24, Heun with 2 intervals 25 (its last interval ends at t = 0: one Euler call)."""
    total = {c: sum(BranchPlan.tempflow(10, 6, completion=c).completion_calls().values())
             for c in ("euler", "x0", "euler:2", "euler:3", "heun:2", "dpm2m:2", "heun")}  # fmt: skip
    assert total == {"euler": 45, "x0": 9, "euler:2": 17, "euler:3": 24, "heun:2": 25, "dpm2m:2": 17, "heun": 81}
    plan = BranchPlan.tempflow(10, 6, completion="euler:2")
    assert plan.model_calls_per_seed() == 9 + 6 * 17  # main path + K completions
    assert 4 * plan.model_calls_per_seed() == 444  # a prompt's 4 seeds (issue 15: 444 instead of 1,116)
    # routes: a sub-grid of the remaining points, from k + 1 to T, spaced by index
    assert plan.routes()[0] == (1, 6, 10) and plan.routes()[7] == (8, 9, 10) and plan.routes()[8] == (9, 10)
    per_step = BranchPlan.tempflow(10, 6, completion="euler:3,3,2")
    assert [len(r) - 1 for r in per_step.routes().values()] == [3, 3, 2, 2, 2, 2, 2, 2, 1]  # the last M repeats
    for k, route in BranchPlan.tempflow(10, 6, completion="euler:4").routes().items():
        assert route[0] == k + 1 and route[-1] == 10 and list(route) == sorted(set(route))


def test_euler_with_every_step_is_the_exact_completion_to_the_bit():
    cfg = RolloutConfig(plan=BranchPlan.tempflow(8, 3), seeds_per_prompt=2, backend="torch")
    exact = rollout(velocity, PROMPTS, reward, cfg, latent_shape=(2,))
    for text in ("euler:7", "euler:100", "euler:9,8,7"):
        full = rollout(velocity, PROMPTS, reward, dataclasses.replace(cfg, plan=BranchPlan.tempflow(8, 3,
                       completion=text)), latent_shape=(2,))  # fmt: skip
        assert torch.equal(full.reward, exact.reward) and torch.equal(full.images, exact.images), text
    cheap = rollout(velocity, PROMPTS, reward, dataclasses.replace(cfg, plan=BranchPlan.tempflow(8, 3,
                    completion="euler:2")), latent_shape=(2,))  # fmt: skip
    # the rows (states, actions, log-probs) do not depend on the completion; only the rewards do
    for name in ("state", "action", "old_log_prob", "step", "branch"):
        assert torch.equal(getattr(cheap, name), getattr(exact, name)), name
    assert not torch.equal(cheap.reward, exact.reward)
    # the last branch step has one step left: every completion is exact there
    last = exact.step == 6
    assert torch.equal(cheap.reward[last], exact.reward[last])


def test_x0_is_the_data_prediction():
    cfg = RolloutConfig(plan=BranchPlan.tempflow(6, 2, completion="x0"), seeds_per_prompt=1, guidance=1.0)
    batch = rollout(velocity, PROMPTS, lambda images, p, m: images[:, 0], cfg, latent_shape=(2,))
    grid = sde.time_grid(6)
    index = batch.prompt_index
    t_next = grid.sigmas[batch.step + 1]
    x0 = batch.action - t_next[:, None] * velocity(batch.action, t_next, index)
    torch.testing.assert_close(batch.reward, x0[:, 0], rtol=0, atol=1e-6)


def fine_solution(x, t0: float, t1: float, n: int = 4000):
    """The flow's ODE from t0 to t1 by RK4 on n steps (reference)."""
    ts = torch.linspace(t0, t1, n + 1, dtype=torch.float64)
    x = x.double()
    index = torch.zeros(x.shape[0], dtype=torch.long)

    def f(y, t):
        return velocity(y.float(), torch.full((y.shape[0],), float(t)), index).double()

    for a, b in zip(ts[:-1], ts[1:], strict=True):
        h = b - a
        k1 = f(x, a)
        k2 = f(x + h / 2 * k1, a + h / 2)
        k3 = f(x + h / 2 * k2, a + h / 2)
        k4 = f(x + h * k3, b)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


@pytest.mark.parametrize("method,order", [("euler", 1), ("heun", 2), ("dpm2m", 2)])
def test_each_solver_has_its_order(method, order):
    """Error at t = 0.2 after n intervals of a uniform grid from 0.9 (no interval ends at t = 0, where every
    completion takes the Euler step): halving the step divides the error by about 2^order."""
    torch.manual_seed(0)
    x = torch.randn(256, 2) * 0.9
    index = torch.zeros(256, dtype=torch.long)
    want = fine_solution(x, 0.9, 0.2)
    errors = []
    for n in (16, 32, 64):
        grid = sde.TimeGrid(torch.linspace(0.9, 0.2, n + 1), torch.linspace(900.0, 200.0, n + 1)[:-1])
        route = tuple(range(n + 1))
        # a route that ends at t = 0.2 > 0: every interval takes the method's own step
        times = grid.sigmas
        got = complete(x, (*route, n + 1), lambda y, m, s=times: velocity(y, s[m].expand(y.shape[0]), index), method,
                       _extended(grid))  # fmt: skip
        errors.append((got.double() - _back_to(want, grid, x, index, method)).norm(dim=1).mean().item())
        del got
    ratios = [errors[i] / errors[i + 1] for i in range(2)]
    assert all(2**order * 0.7 < r < 2**order * 1.5 for r in ratios), (method, errors, ratios)


def _extended(grid):
    """``grid`` with a final point 0 appended: the routes above stop at the point before it."""
    sigmas = torch.cat([grid.sigmas, torch.zeros(1)])
    return sde.TimeGrid(sigmas, torch.cat([grid.timesteps, grid.sigmas[-1:] * 1000]))


def _back_to(want, grid, x, index, method):
    """The route's last interval ends at t = 0 (an Euler step for every method); subtract it out by taking the same
    Euler step from the exact solution at the last grid time, so the comparison is at t = 0.2."""
    t = grid.sigmas[-1]
    v = velocity(want.float(), t.expand(want.shape[0]), index).double()
    return want - t.double() * v


def test_dpm2m_with_the_current_data_prediction_is_the_euler_step():
    torch.manual_seed(1)
    grid = sde.time_grid(10)
    x, v = torch.randn(5, 3), torch.randn(5, 3)
    d0 = sde.data_prediction(x, v, 3, grid)
    torch.testing.assert_close(sde.dpm2m_step(x, v, d0, 3, 5, 2, grid), sde.ode_step(x, v, 3, grid, to=5))
    torch.testing.assert_close(sde.ode_step(x, v, 3, grid, to=10), d0)  # Euler to t = 0 is the data prediction
    assert torch.equal(sde.ode_step(x, v, torch.full((5,), 3), grid, to=torch.full((5,), 4)), sde.ode_step(x, v, 3,
                       grid))  # fmt: skip


def test_naive_loop_counts_the_cheaper_calls():
    stats = {}
    plan = BranchPlan.tempflow(10, 6, completion="heun:2")
    cfg = RolloutConfig(plan=plan, seeds_per_prompt=1, backend="torch")
    naive_rollout(velocity, PROMPTS[:1], reward, cfg, latent_shape=(2,), stats=stats)
    assert stats["model_calls"] == 9 + 25  # main path + one batched call per completion forward


def test_the_completion_setting():
    assert TrainConfig().completion == "euler" and TrainConfig().plan().completion.exact
    cfg = TrainConfig.from_sources(None, ["completion=euler:3,2"])
    assert cfg.completion == "euler:3,2" and cfg.plan().completion == Completion("euler", (3, 2))
    assert TrainConfig(completion=2).completion == "euler:2" and TrainConfig(completion="x0").completion == "euler:1"
    with pytest.raises(SettingError, match="completion='rk4'"):
        TrainConfig(completion="rk4")
    with pytest.raises(SettingError, match="only tempflow completes branches"):
        TrainConfig(method="flow-grpo", completion="euler:2")


@pytest.mark.slow
def test_train_with_a_cheap_completion(tmp_path):
    """Two iterations of the digits model with euler:2: the trainer logs the sampling forwards, fewer than exact."""
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    import json

    from tempflow.models import digits as dg
    from tempflow.rewards import DigitCorrectness
    from tempflow.train import train

    samples = {}
    for text in ("euler", "euler:2"):
        torch.manual_seed(0)
        model = dg.DigitsModel(dg.DigitsConfig(num_layers=1, attention_head_dim=8, num_attention_heads=2, text_dim=16))
        cfg = TrainConfig(steps=6, branches=2, seeds_per_prompt=2, prompts_per_iteration=1, iterations=2, lora_rank=4,
                          lora_alpha=8, eval_prompts="", completion=text, out=str(tmp_path / text))  # fmt: skip
        train(model, "digits", DigitCorrectness(), cfg, log=lambda *_: None)
        lines = [json.loads(line) for line in open(tmp_path / text / "metrics.jsonl")]
        samples[text] = [m["rollout_samples"] for m in lines]
        assert all(m["rollout_samples"] == 2 * cfg.plan().model_calls_per_seed() for m in lines)
    assert samples["euler:2"][0] < samples["euler"][0]


# --------------------------------------------------------------------------------------------------------------
# adaptive branch steps


def test_spread_per_step_and_the_skipping_rule():
    from tempflow.train.adaptive import AdaptiveSteps, spread_per_step

    # two groups of K = 2 at step 0 (spreads 1 and 3), one at step 1 (spread 0)
    reward = torch.tensor([0.0, 2.0, 1.0, 7.0, 5.0, 5.0])
    step = torch.tensor([0, 0, 0, 0, 1, 1])
    assert spread_per_step(reward, step, 2) == {0: (4.0, 2), 1: (0.0, 1)}
    ada = AdaptiveSteps((0, 1, 2), threshold=0.1, window=2, probe_every=5)
    assert ada.active(1) == (0, 1, 2)  # nothing observed yet
    for _ in range(2):
        rel = ada.observe([{0: (2.0, 1), 1: (0.1, 1)}, {0: (2.0, 1), 1: (0.1, 1), 2: (1.0, 1)}])  # two ranks
        assert rel == {0: 1.0, 1: pytest.approx(0.05), 2: 0.5}
    assert ada.active(3) == (0, 2)  # step 1 stayed below 10% of the widest over its last 2 observations
    assert ada.active(5) == (0, 1, 2)  # a probe iteration runs every step
    ada.observe([{0: (1.0, 1), 1: (0.5, 1), 2: (1.0, 1)}])  # the probe finds step 1 spread again
    assert ada.active(6) == (0, 1, 2)
    again = AdaptiveSteps((0, 1, 2), threshold=0.1, window=2, probe_every=5)
    again.load_state_dict(ada.state_dict())
    assert again.history == ada.history
    assert AdaptiveSteps((0, 1), threshold=0.0).active(3) == (0, 1)  # off


def test_a_subset_plan_keeps_each_steps_budget():
    plan = BranchPlan.tempflow(10, 6, completion="euler:4,3,2,1")
    sub = plan.subset((1, 3, 5))
    assert sub.sde_steps == (1, 3, 5) and [len(sub.routes()[k]) - 1 for k in (1, 3, 5)] == [3, 1, 1]
    assert BranchPlan.tempflow(10, 6).subset((0, 4)).completion.exact
    with pytest.raises(ValueError, match="not all branch steps"):
        BranchPlan.tempflow(10, 6, branch_steps=[0, 1]).subset((0, 5))


@pytest.mark.slow
def test_adaptive_steps_skip_calls_and_resume_exactly(tmp_path):
    """A tiny run that skips steps (threshold 0.99: every step but the widest, after one observation; a probe every
    third iteration) forwards fewer samples on the skipping iterations, and a resumed run equals the uninterrupted
    one in every logged value (the skip state is in the checkpoint)."""
    pytest.importorskip("peft")
    import json

    from tempflow.rewards import DigitCorrectness
    from tempflow.train import train
    from tests.test_trainer import tiny_config, tiny_model

    kw = dict(steps=4, branches=3, iterations=6, skip_spread=0.99, skip_window=1, skip_probe=3, checkpoint_every=2,
              completion="euler:2")  # fmt: skip

    def metrics(out):
        return [{k: v for k, v in json.loads(line).items() if not k.endswith("_s")} for line in open(out)]

    train(tiny_model(), "digits", DigitCorrectness(), tiny_config(tmp_path / "a", **kw), log=lambda *_: None)
    whole = metrics(tmp_path / "a" / "metrics.jsonl")
    steps = [m["branch_steps"] for m in whole]
    assert steps[0] == 3 and steps[3] == 3 and min(steps) == 1  # probes at iterations 0 and 3 (0-based)
    full = 2 * tiny_config(tmp_path, **kw).plan().model_calls_per_seed()
    assert all((m["rollout_samples"] < full) == (m["branch_steps"] < 3) for m in whole)
    cfg = tiny_config(tmp_path / "b", **{**kw, "iterations": 4})
    train(tiny_model(), "digits", DigitCorrectness(), cfg, log=lambda *_: None)
    train(tiny_model(), "digits", DigitCorrectness(), tiny_config(tmp_path / "b", **kw), resume=True,
          log=lambda *_: None)  # fmt: skip
    assert metrics(tmp_path / "b" / "metrics.jsonl") == whole
