import math

import pytest
import torch

from tempflow import rng, sde
from tempflow.models import GaussianMixtureFlow

SHAPES = {"sd3": (3, 4, 6, 5), "flux": (3, 7, 8), "video": (2, 3, 2, 4, 3), "vector": (4, 5)}


def make_table(schedule="flow-grpo", steps=10, a=0.7):
    return sde.sde_table(sde.time_grid(steps, shift=3.0), schedule, a)


# ---- tables against the formulas written out directly ------------------------------------------------------


def test_flow_grpo_table_matches_formula():
    table = make_table("flow-grpo", 10, 0.7)
    t = table.grid.sigmas.double()
    for k in range(10):
        tk, tn = t[k].item(), t[k + 1].item()
        denom = t[1].item() if tk == 1 else tk
        sigma = 0.7 * math.sqrt(tk / (1 - denom))
        dt = tn - tk
        assert table.sigma[k].item() == pytest.approx(sigma, rel=1e-6)
        assert table.std[k].item() == pytest.approx(sigma * math.sqrt(-dt), rel=1e-6)
        assert table.coef_x[k].item() == pytest.approx(1 + sigma**2 / (2 * tk) * dt, rel=1e-6)
        assert table.coef_v[k].item() == pytest.approx((1 + sigma**2 * (1 - tk) / (2 * tk)) * dt, rel=1e-6)


def test_cps_mean_is_coefficients_preserving():
    table = make_table("cps", 10, 0.6)
    x, v = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    for k in range(10):
        t, tn = table.grid.sigmas[k], table.grid.sigmas[k + 1]
        std = tn * math.sin(0.6 * math.pi / 2)
        x0_hat, x1_hat = x - t * v, x + (1 - t) * v
        expected = x0_hat * (1 - tn) + x1_hat * torch.sqrt(tn**2 - std**2)
        torch.testing.assert_close(sde.sde_mean(x, v, k, table), expected, rtol=1e-5, atol=1e-5)
        assert table.std[k].item() == pytest.approx(std.item(), rel=1e-6, abs=1e-9)


def test_dance_mean_is_dancegrpo_score_form():
    eta = 0.3
    table = make_table("dance", 10, eta)
    x, v = torch.randn(4, 6, 7), torch.randn(4, 6, 7)
    for k in range(10):
        t, tn = table.grid.sigmas[k], table.grid.sigmas[k + 1]
        dsigma = tn - t
        x0_hat = x - t * v
        score = -(x - x0_hat * (1 - t)) / t**2
        expected = x + dsigma * v + (-0.5 * eta**2 * score) * dsigma
        torch.testing.assert_close(sde.sde_mean(x, v, k, table), expected, rtol=1e-5, atol=1e-5)
        assert table.std[k].item() == pytest.approx(eta * math.sqrt(-dsigma.item()), rel=1e-6)


# ---- log-prob, gradient, KL --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SHAPES))
def test_log_prob_is_mean_of_normal_log_density(name):
    table = make_table()
    x, v = torch.randn(SHAPES[name]), torch.randn(SHAPES[name])
    for k in (0, 4, 9):
        out = sde.sde_step(x, v, k, table, noise=torch.randn(SHAPES[name]))
        dist = torch.distributions.Normal(out.mean.double(), out.std.double())
        expected = dist.log_prob(out.sample.double()).mean(dim=tuple(range(1, x.dim())))
        torch.testing.assert_close(out.log_prob.double(), expected, rtol=1e-6, atol=1e-6)
        assert out.log_prob.shape == (x.shape[0],) and out.log_prob.dtype == torch.float32


def test_ratio_is_exactly_one_on_policy():
    table = make_table()
    x, v = torch.randn(5, 4, 8, 8), torch.randn(5, 4, 8, 8)
    for k in range(10):
        old = sde.sde_step(x, v, k, table, noise=torch.randn_like(x))
        new = sde.sde_step(x, v, k, table, sample=old.sample)
        assert torch.equal(torch.exp(new.log_prob - old.log_prob), torch.ones(5))


@pytest.mark.parametrize("schedule", sde.SCHEDULES)
@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_log_prob_gradient_matches_analytic(schedule, name):
    table = make_table(schedule)
    shape = SHAPES[name]
    x = torch.randn(shape, dtype=torch.float64).float()
    sample = torch.randn(shape)
    steps = torch.tensor([0, 3, 8][: shape[0]])
    v = torch.randn(shape, requires_grad=True)
    out = sde.sde_step(x, v, steps, table, sample=sample)
    (grad,) = torch.autograd.grad(out.log_prob.sum(), v)
    cv = sde.at_step(table.coef_v, steps, x)
    analytic = sde.log_prob_grad_v(sample, out.mean, out.std, cv, kind=table.logprob_kind)
    torch.testing.assert_close(grad, analytic, rtol=1e-5, atol=1e-8)
    assert torch.all(grad.abs().sum(dim=tuple(range(1, grad.dim()))) > 0)


def test_sample_is_treated_as_data():
    table = make_table()
    x, v = torch.randn(2, 3, 4), torch.randn(2, 3, 4, requires_grad=True)
    sample = (x + 0.1 * v).detach().requires_grad_(True)
    sde.sde_step(x, v, 2, table, sample=sample).log_prob.sum().backward()
    assert sample.grad is None and v.grad is not None


def test_kl_exact_and_zero_for_identical_models():
    table = make_table()
    x, v = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    v_ref = v + 0.05 * torch.randn_like(v)
    for k in (0, 5, 8):
        assert torch.equal(sde.kl_from_velocity(v, v, k, table), torch.zeros(3))
        m, m_ref = sde.sde_mean(x, v, k, table), sde.sde_mean(x, v_ref, k, table)
        std = table.std[k]
        kl_ref = torch.distributions.kl_divergence(
            torch.distributions.Normal(m.double(), std.double()),
            torch.distributions.Normal(m_ref.double(), std.double()),
        ).mean(dim=(1, 2, 3))
        torch.testing.assert_close(sde.kl(m, m_ref, std).double(), kl_ref, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(
            sde.kl_from_velocity(v, v_ref, k, table), sde.kl(m, m_ref, std), rtol=1e-4, atol=1e-9
        )


# ---- shapes, dtypes, per-sample steps, branches ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(SHAPES))
def test_low_precision_inputs_use_fp32_maths(dtype, name):
    table = make_table()
    x, v, eps = (torch.randn(SHAPES[name]).to(dtype) for _ in range(3))
    out = sde.sde_step(x, v, 3, table, noise=eps)
    ref = sde.sde_step(x.float(), v.float(), 3, table, noise=eps.float())
    for got, want in zip(out, ref, strict=True):
        assert got.dtype == torch.float32
        assert torch.equal(got, want)
    assert sde.ode_step(x, v, 3, table.grid).dtype == torch.float32


def test_per_sample_steps_equal_a_loop():
    table = make_table("flow-grpo")
    x, v, eps = torch.randn(6, 4, 3, 3), torch.randn(6, 4, 3, 3), torch.randn(6, 4, 3, 3)
    steps = torch.tensor([0, 9, 4, 4, 1, 7])
    batched = sde.sde_step(x, v, steps, table, noise=eps)
    ode = sde.ode_step(x, v, steps, table.grid)
    for i, k in enumerate(steps.tolist()):
        one = sde.sde_step(x[i : i + 1], v[i : i + 1], k, table, noise=eps[i : i + 1])
        torch.testing.assert_close(batched.sample[i : i + 1], one.sample, rtol=0, atol=0)
        torch.testing.assert_close(batched.log_prob[i : i + 1], one.log_prob, rtol=1e-7, atol=1e-7)
        assert torch.equal(ode[i : i + 1], sde.ode_step(x[i : i + 1], v[i : i + 1], k, table.grid))


def test_branches_share_one_velocity():
    # K one-step branches from one state: (B, 1, ...) mean, (B, K, ...) samples, log-prob (B, K)
    table = make_table()
    B, K = 2, 6
    x, v = torch.randn(B, 4, 5, 5), torch.randn(B, 4, 5, 5)
    ids = torch.tensor([[p, 0, 3, b] for p in range(B) for b in range(K)]).reshape(B, K, 4)
    eps = rng.normal(0, ids, (4, 5, 5))
    mean = sde.sde_mean(x, v, 3, table).unsqueeze(1)
    std = table.std[3]
    actions = mean + std * eps
    lp = sde.log_prob(actions, mean, std, batch_dims=2)
    assert lp.shape == (B, K)
    for b in range(K):
        one = sde.sde_step(x, v, 3, table, noise=eps[:, b])
        torch.testing.assert_close(actions[:, b], one.sample, rtol=0, atol=0)
        torch.testing.assert_close(lp[:, b], one.log_prob, rtol=1e-6, atol=1e-6)


def test_ode_step_matches_diffusers_scheduler():
    diffusers = pytest.importorskip("diffusers")
    s = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    s.set_timesteps(10)
    grid = sde.time_grid(10, 3.0)
    x = x_ref = torch.randn(2, 4, 6, 6)
    for k, t in enumerate(s.timesteps):
        v = torch.randn_like(x)
        x_ref = s.step(v, t, x_ref).prev_sample
        x = sde.ode_step(x, v, k, grid)
        assert torch.equal(x, x_ref)


def test_generator_draws_are_reproducible():
    table = make_table()
    x, v = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    a = sde.sde_step(x, v, 1, table, generator=torch.Generator().manual_seed(5))
    b = sde.sde_step(x, v, 1, table, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.sample, b.sample)


def test_no_host_synchronisation_inside_a_step():
    # Meta tensors have no values: any .item()/bool() on them raises, so these calls prove the step never syncs.
    table = sde.sde_table(sde.time_grid(10).to("meta"), "flow-grpo", 0.7)
    x = torch.empty(4, 16, 8, 8, device="meta")
    steps = torch.zeros(4, dtype=torch.long, device="meta")
    for step in (3, steps):
        out = sde.sde_step(x, x, step, table, noise=x, check_finite=False)
        assert out.sample.shape == x.shape and out.log_prob.shape == (4,)
        sde.ode_step(x, x, step, table, check_finite=False)
        sde.kl_from_velocity(x, x, step, table)
        sde.sde_step(x, x, step, table, sample=x, check_finite=False)


# ---- noise-aware weights ---------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", sde.SCHEDULES)
@pytest.mark.parametrize("trained", [None, [0, 1, 2, 3], [2, 5, 8], range(10)])
def test_noise_aware_weights_average_one(schedule, trained):
    table = make_table(schedule)
    if schedule == "cps" and trained is not None and 9 in trained:
        trained = range(9)  # cps has zero noise on its last step
    w = sde.noise_aware_weights(table, trained)
    steps = list(trained) if trained is not None else list(range(9))
    assert w.shape == (10,)
    assert w[steps].double().mean().item() == pytest.approx(1.0, abs=1e-6)
    ratio = w.double() / table.std.double()
    assert torch.allclose(ratio[steps], ratio[steps[0]].expand(len(steps)), rtol=1e-5)


def test_noise_aware_weights_follow_the_grid_and_noise_level():
    w7 = sde.noise_aware_weights(make_table(a=0.7))
    w9 = sde.noise_aware_weights(make_table(a=0.9))
    torch.testing.assert_close(w7, w9)  # a cancels in the normalisation for flow-grpo
    flux = sde.sde_table(sde.flux_time_grid(10, 4096), "flow-grpo", 0.9)
    assert not torch.allclose(sde.noise_aware_weights(flux), w7)  # but the grid does not
    assert w7[0] > w7[8]  # early, noisy steps are weighted up


def test_weights_bad_input():
    table = make_table()
    with pytest.raises(IndexError, match="outside"):
        sde.noise_aware_weights(table, [0, 10])
    with pytest.raises(ValueError, match="empty"):
        sde.noise_aware_weights(table, [])
    with pytest.raises(ValueError, match="repeat"):
        sde.noise_aware_weights(table, [1, 1])
    with pytest.raises(ValueError, match="zero noise"):
        sde.noise_aware_weights(make_table("cps"), [9])


# ---- bad input ---------------------------------------------------------------------------------------------


def test_bad_step_input():
    table = make_table()
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="shapes differ"):
        sde.sde_step(x, torch.randn(2, 3, 5), 0, table)
    with pytest.raises(FloatingPointError, match="non-finite"):
        sde.sde_step(x, torch.full_like(x, float("nan")), 0, table)
    with pytest.raises(IndexError, match="outside the grid"):
        sde.sde_step(x, x, 10, table)
    with pytest.raises(TypeError, match="not a timestep value"):
        sde.sde_step(x, x, torch.tensor([0.5, 0.5]), table)
    with pytest.raises(TypeError, match="int or an integer tensor"):
        sde.sde_step(x, x, 0.5, table)
    with pytest.raises(ValueError, match="leading shape"):
        sde.sde_step(x, x, torch.tensor([0, 1, 2]), table)
    with pytest.raises(ValueError, match="noise shape"):
        sde.sde_step(x, x, 0, table, noise=torch.randn(2, 3))
    with pytest.raises(ValueError, match="unknown noise schedule"):
        sde.sde_table(table.grid, "ddim")
    with pytest.raises(ValueError, match="positive number"):
        sde.sde_table(table.grid, "flow-grpo", 0.0)
    with pytest.raises(ValueError, match="cps needs noise_level"):
        sde.sde_table(table.grid, "cps", 1.5)


# ---- end to end: every schedule carries noise to the data distribution ------------------------------------


def _sample(flow, grid, table, n, seed=0):
    idx = torch.arange(n)
    x = rng.normal(seed, torch.stack([idx, torch.full_like(idx, -1)], 1), (flow.dim,))
    for k in range(grid.num_steps):
        v = flow.velocity(x, grid.sigmas[k].item())
        eps = rng.normal(seed, torch.stack([idx, torch.full_like(idx, k)], 1), (flow.dim,))
        x = sde.ode_step(x, v, k, grid) if table is None else sde.sde_step(x, v, k, table, noise=eps).sample
    return x


@pytest.mark.parametrize("schedule", [None, "flow-grpo", "dance"])
def test_sde_preserves_the_marginals(schedule):
    flow = GaussianMixtureFlow.ring(4, radius=2.0, std=0.3)
    grid = sde.time_grid(40, 3.0)
    table = None if schedule is None else sde.sde_table(grid, schedule, 0.7)
    x = _sample(flow, grid, table, 8000)
    share = torch.bincount(flow.assign(x), minlength=4).double() / len(x)
    within = (x.double() - flow.means[flow.assign(x)]).std().item()
    assert (share - 0.25).abs().max() < 0.03
    assert within == pytest.approx(0.3, rel=0.08)
    assert x.double().std(0).mean().item() == pytest.approx(1.446, rel=0.04)


def test_a_wrong_sde_is_caught_by_the_marginal_check():
    # Negative control: adding the noise without the score correction of the drift inflates every mode.
    flow = GaussianMixtureFlow.ring(4, radius=2.0, std=0.3)
    grid = sde.time_grid(40, 3.0)
    table = sde.sde_table(grid, "flow-grpo", 0.7)
    broken = sde.SDETable(**{**table.__dict__, "coef_x": torch.ones_like(table.coef_x), "coef_v": table.dt})
    x = _sample(flow, grid, broken, 8000)
    within = (x.double() - flow.means[flow.assign(x)]).std().item()
    assert within > 0.3 * 1.3


def test_log_prob_with_per_element_std():
    sample, mean = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    for std in (torch.rand(3, 4, 5) + 0.1, torch.rand(3, 1, 5) + 0.1, torch.rand(4, 1) + 0.1, torch.tensor(0.3)):
        expected = torch.distributions.Normal(mean.double(), std.double()).log_prob(sample.double()).mean(dim=(1, 2))
        torch.testing.assert_close(sde.log_prob(sample, mean, std).double(), expected, rtol=1e-6, atol=1e-6)
    branches = torch.rand(3, 2, 1, 1) + 0.1  # (B, K) branches with their own std
    s2, m2 = torch.randn(3, 2, 4, 5), torch.randn(3, 2, 4, 5)
    expected = torch.distributions.Normal(m2.double(), branches.double()).log_prob(s2.double()).mean(dim=(2, 3))
    torch.testing.assert_close(sde.log_prob(s2, m2, branches, batch_dims=2).double(), expected, rtol=1e-6, atol=1e-6)
