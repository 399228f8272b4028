import numpy as np
import pytest
import torch

from tempflow import sde

diffusers = pytest.importorskip("diffusers")
Scheduler = diffusers.FlowMatchEulerDiscreteScheduler


@pytest.mark.parametrize("steps", [1, 2, 10, 28, 40])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_static_shift_grid_is_diffusers(steps, shift):
    s = Scheduler(shift=shift)
    s.set_timesteps(steps)
    g = sde.time_grid(steps, shift=shift)
    assert torch.equal(g.sigmas, s.sigmas) and torch.equal(g.timesteps, s.timesteps)


def test_sd3_grid_values_from_the_spec():
    expected = [1.0, 0.9601, 0.9133, 0.8577, 0.7904, 0.7073, 0.6022, 0.4649, 0.278, 0.0089, 0.0]
    assert np.allclose(sde.time_grid(10, shift=3.0).sigmas.tolist(), expected, atol=6e-5)


@pytest.mark.parametrize("steps", [4, 10, 28])
@pytest.mark.parametrize("tokens", [256, 1024, 4096])
def test_flux_grids_are_diffusers(steps, tokens):
    mu = sde.flux_mu(tokens)
    s = Scheduler(shift=3.0, use_dynamic_shifting=True)
    s.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    g = sde.flux_time_grid(steps, tokens)
    assert torch.equal(g.sigmas, s.sigmas) and torch.equal(g.timesteps, s.timesteps)
    s2 = Scheduler(use_dynamic_shifting=True)
    s2.set_timesteps(steps, mu=mu)
    g2 = sde.time_grid(steps, mu=mu)
    assert torch.equal(g2.sigmas, s2.sigmas) and torch.equal(g2.timesteps, s2.timesteps)


def test_flux_mu_endpoints():
    assert sde.flux_mu(256) == pytest.approx(0.5)
    assert sde.flux_mu(4096) == pytest.approx(1.15)
    assert sde.flux_mu(2176) == pytest.approx(0.825)


def test_grid_from_scheduler_any_config():
    s = Scheduler(shift=3.0, use_karras_sigmas=True)
    s.set_timesteps(12)
    g = sde.grid_from_scheduler(s)
    assert torch.equal(g.sigmas, s.sigmas) and g.num_steps == 12
    with pytest.raises(TypeError, match="flow-matching scheduler"):
        sde.grid_from_scheduler(object())


def test_grid_bad_input():
    with pytest.raises(ValueError, match="positive integer"):
        sde.time_grid(0)
    with pytest.raises(ValueError, match=r"lie in \(0, 1\]"):
        sde.time_grid(3, sigmas=[1.0, 0.5, 1.5])
    with pytest.raises(ValueError, match="must lie in"):
        sde.TimeGrid(torch.tensor([1000.0, 500.0, 0.0]), torch.tensor([1000.0, 500.0]))
    with pytest.raises(ValueError, match="strictly decrease"):
        sde.TimeGrid(torch.tensor([0.5, 0.8, 0.0]), torch.tensor([500.0, 800.0]))
    with pytest.raises(ValueError, match="timesteps must have"):
        sde.TimeGrid(torch.tensor([1.0, 0.5, 0.0]), torch.tensor([1000.0]))


@pytest.mark.parametrize("steps", [2, 10, 50])
@pytest.mark.parametrize("tokens", [16, 1024, 4096, 8192])
def test_qwenimage_grids_are_diffusers(steps, tokens):
    """Qwen-Image's grid: FLUX's formula with its scheduler config, then the stretch to shift_terminal 0.02."""
    cfg = {"base_image_seq_len": 256, "max_image_seq_len": 8192, "base_shift": 0.5, "max_shift": 0.9}
    s = Scheduler(use_dynamic_shifting=True, shift_terminal=0.02, time_shift_type="exponential", **cfg)
    mu = sde.flux_mu(tokens, 256, 8192, 0.5, 0.9)
    s.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    g = sde.qwenimage_time_grid(steps, tokens)
    assert torch.equal(g.sigmas, s.sigmas) and torch.equal(g.timesteps, s.timesteps)
    assert g.sigmas[0] == 1 and g.sigmas[-2].item() == pytest.approx(0.02, abs=1e-6)
    s2 = Scheduler(shift=3.0, shift_terminal=0.1)  # the stretch after a static shift too
    s2.set_timesteps(steps)
    assert torch.equal(sde.time_grid(steps, shift=3.0, shift_terminal=0.1).sigmas, s2.sigmas)


def test_shift_terminal_bad_input():
    with pytest.raises(ValueError, match="num_steps >= 2"):
        sde.qwenimage_time_grid(1, 4096)
    with pytest.raises(ValueError, match=r"shift_terminal must lie in \(0, 1\)"):
        sde.time_grid(4, shift_terminal=1.5)
    with pytest.raises(TypeError, match="unknown qwenimage_time_grid settings"):
        sde.qwenimage_time_grid(4, 4096, max_shfit=1.0)


@pytest.mark.parametrize("steps", [1, 2, 10, 28, 50])
@pytest.mark.parametrize("flow_shift", [1.0, 3.0, 5.0])
def test_wan_grids_are_the_shipped_unipc_schedulers(steps, flow_shift):
    """Wan's scheduler (UniPCMultistepScheduler with flow sigmas and a static flow_shift): the same sigmas bit for
    bit, and timesteps 1000 t where the scheduler truncates to integers; not FlowMatchEuler's spacing."""
    s = diffusers.UniPCMultistepScheduler(
        use_flow_sigmas=True, flow_shift=flow_shift, prediction_type="flow_prediction"
    )
    s.set_timesteps(steps)
    g = sde.wan_time_grid(steps, flow_shift)
    assert torch.equal(g.sigmas, s.sigmas)
    assert (g.timesteps - s.timesteps).abs().max() < 1 and g.timesteps.dtype == torch.float32
    if steps > 1:
        assert not torch.equal(g.sigmas, sde.time_grid(steps, shift=flow_shift).sigmas)
    with pytest.raises(ValueError, match="flow_shift must be > 0"):
        sde.wan_time_grid(steps, 0.0)


@pytest.mark.parametrize("steps", [1, 2, 10, 28, 50])
@pytest.mark.parametrize("tokens", [16, 1024, 4096, 4301, 8192])
def test_flux2_grids_are_diffusers(steps, tokens):
    """FLUX.2's grid: linspace sigmas, the exponential shift of compute_empirical_mu, which follows the step count
    below 4300 tokens and not above; a scheduler config's shift_terminal stretches it as the scheduler does."""
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    mu = compute_empirical_mu(tokens, steps)
    assert sde.flux2_mu(tokens, steps) == mu
    assert (sde.flux2_mu(tokens, steps) == sde.flux2_mu(tokens, steps + 5)) == (tokens > 4300)
    s = Scheduler(use_dynamic_shifting=True, time_shift_type="exponential")
    s.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    g = sde.flux2_time_grid(steps, tokens)
    assert torch.equal(g.sigmas, s.sigmas) and torch.equal(g.timesteps, s.timesteps)
    if steps > 1:
        s = Scheduler(use_dynamic_shifting=True, time_shift_type="exponential", shift_terminal=0.05)
        s.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        assert torch.equal(sde.flux2_time_grid(steps, tokens, shift_terminal=0.05).sigmas, s.sigmas)
