import sys
import types

import pytest
import torch

from tempflow.compat import flow_grpo as compat
from tempflow.compat.flow_grpo_eager import eager_sde_step_with_logprob as original_sde_step_with_logprob

diffusers = pytest.importorskip("diffusers")


def scheduler(steps=10, shift=3.0):
    s = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    s.set_timesteps(steps)
    return s


def assert_same(ours, theirs, exact_sample=False):
    assert len(ours) == len(theirs)
    for name, a, b in zip(["prev_sample", "log_prob", "mean", "std_dev_t", "sqrt_dt"], ours, theirs, strict=False):
        assert a.dtype == torch.float32, name
        b = b.expand_as(a) if b.dim() == a.dim() else b
        assert a.shape == b.shape, (name, a.shape, b.shape)
        scale = max(float(b.abs().max()), 1.0)
        torch.testing.assert_close(a, b, rtol=4e-6, atol=4e-6 * scale, msg=name)


SHAPES = [(4, 16, 8, 8), (3, 64, 12), (2, 4, 3, 6, 6)]


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
@pytest.mark.parametrize("shape", SHAPES, ids=["sd3", "flux", "video"])
def test_matches_flow_grpo_with_generator(sde_type, shape):
    s = scheduler()
    x, v = torch.randn(shape), torch.randn(shape)
    for k in range(10):
        ts = s.timesteps[[k] * shape[0]]
        g1, g2 = torch.Generator().manual_seed(k), torch.Generator().manual_seed(k)
        theirs = original_sde_step_with_logprob(s, v, ts, x, 0.7, generator=g1, sde_type=sde_type, return_sqrt_dt=True)
        ours = compat.sde_step_with_logprob(s, v, ts, x, 0.7, generator=g2, sde_type=sde_type, return_sqrt_dt=True)
        assert_same(ours, theirs)
        # the same generator gives the same noise, bit for bit
        std = ours[4] * ours[3] if sde_type == "sde" else ours[3]
        noise_theirs = torch.randn(shape, generator=torch.Generator().manual_seed(k))
        if k < 9 or sde_type == "sde":
            recovered = (ours[0] - ours[2]) / std
            torch.testing.assert_close(recovered, noise_theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_matches_flow_grpo_scoring_given_samples(sde_type):
    s = scheduler()
    B = 5
    x, v, prev = torch.randn(B, 4, 6, 6), torch.randn(B, 4, 6, 6), torch.randn(B, 4, 6, 6)
    ts = s.timesteps[torch.tensor([0, 2, 2, 7, 8])]  # different steps per sample, as in training
    theirs = original_sde_step_with_logprob(s, v, ts, x, 0.7, prev_sample=prev, sde_type=sde_type)
    ours = compat.sde_step_with_logprob(s, v, ts, x, 0.7, prev_sample=prev, sde_type=sde_type)
    assert_same(ours, theirs)
    assert torch.equal(ours[0], prev)


def test_no_generator_uses_the_global_stream():
    s = scheduler()
    x, v = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    torch.manual_seed(123)
    theirs = original_sde_step_with_logprob(s, v, s.timesteps[:1], x)
    torch.manual_seed(123)
    ours = compat.sde_step_with_logprob(s, v, s.timesteps[:1], x)
    assert_same(ours, theirs)


def test_list_of_generators():
    s = scheduler()
    x, v = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(3)]  # noqa: E731
    theirs = original_sde_step_with_logprob(s, v, s.timesteps[[1, 1, 1]], x, generator=gens())
    ours = compat.sde_step_with_logprob(s, v, s.timesteps[[1, 1, 1]], x, generator=gens())
    assert_same(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_model_output_is_upcast(dtype):
    s = scheduler()
    x, v = torch.randn(2, 4, 6, 6).to(dtype), torch.randn(2, 4, 6, 6).to(dtype)
    prev = torch.randn(2, 4, 6, 6).to(dtype)
    theirs = original_sde_step_with_logprob(s, v, s.timesteps[[3, 3]], x, prev_sample=prev)
    ours = compat.sde_step_with_logprob(s, v, s.timesteps[[3, 3]], x, prev_sample=prev)
    assert_same(ours, theirs)


def test_return_shapes_and_length_one_timestep():
    s = scheduler()
    x, v = torch.randn(4, 16, 8, 8), torch.randn(4, 16, 8, 8)
    out = compat.sde_step_with_logprob(s, v, s.timesteps[2:3], x)
    assert len(out) == 4
    prev, lp, mean, std = out
    assert prev.shape == mean.shape == x.shape and lp.shape == (4,) and std.shape == (4, 1, 1, 1)
    out5 = compat.sde_step_with_logprob(s, v, s.timesteps[2:3], x, return_sqrt_dt=True)
    assert len(out5) == 5 and out5[4].shape == (4, 1, 1, 1)
    torch.testing.assert_close(out5[4] ** 2, (s.sigmas[2] - s.sigmas[3]).expand(4, 1, 1, 1))


def test_sigma_one_uses_the_second_grid_point():
    s = scheduler()
    assert s.sigmas[0].item() == 1.0
    x, v = torch.randn(1, 2, 2, 2), torch.randn(1, 2, 2, 2)
    std = compat.sde_step_with_logprob(s, v, s.timesteps[:1], x, noise_level=0.7)[3]
    expected = 0.7 * (1.0 / (1 - s.sigmas[1].item())) ** 0.5
    assert std.item() == pytest.approx(expected, rel=1e-6)


def test_step_indices_follow_diffusers_rule():
    ts = torch.tensor([1000.0, 800.0, 800.0, 500.0])
    idx = compat.step_indices(ts, torch.tensor([1000.0, 800.0, 500.0]))
    expected = []
    for t in (1000.0, 800.0, 500.0):
        found = (ts == t).nonzero()
        expected.append(found[1 if len(found) > 1 else 0].item())
    assert idx.tolist() == expected == [0, 2, 3]


def test_table_cache_follows_set_timesteps():
    s = scheduler(10)
    x, v = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    compat.sde_step_with_logprob(s, v, s.timesteps[[4, 4]], x)
    s.set_timesteps(20)
    theirs = original_sde_step_with_logprob(s, v, s.timesteps[[4, 4]], x, generator=torch.Generator().manual_seed(0))
    ours = compat.sde_step_with_logprob(s, v, s.timesteps[[4, 4]], x, generator=torch.Generator().manual_seed(0))
    assert_same(ours, theirs)


def test_bad_input():
    s = scheduler()
    x = torch.randn(2, 4, 4, 4)
    with pytest.raises(ValueError, match="not on the scheduler's grid"):
        compat.sde_step_with_logprob(s, x, torch.tensor([123.4, 123.4]), x)
    with pytest.raises(ValueError, match="does not match sample shape"):
        compat.sde_step_with_logprob(s, torch.randn(2, 4, 4, 5), s.timesteps[:1], x)
    with pytest.raises(ValueError, match="1 or B=2"):
        compat.sde_step_with_logprob(s, x, s.timesteps[:3], x)
    with pytest.raises(ValueError, match="sde_type"):
        compat.sde_step_with_logprob(s, x, s.timesteps[:1], x, sde_type="ode")


def test_randn_tensor_is_diffusers():
    from diffusers.utils.torch_utils import randn_tensor

    for gen in (torch.Generator().manual_seed(3), [torch.Generator().manual_seed(i) for i in range(2)]):
        a = compat.randn_tensor((2, 3, 4), generator=gen, device=torch.device("cpu"), dtype=torch.float32)
        gen2 = (
            [torch.Generator().manual_seed(i) for i in range(2)]
            if isinstance(gen, list)
            else torch.Generator().manual_seed(3)
        )
        b = randn_tensor((2, 3, 4), generator=gen2, device=torch.device("cpu"), dtype=torch.float32)
        assert torch.equal(a, b)


@pytest.fixture
def fake_flow_grpo(monkeypatch):
    """A stand-in for an imported Flow-GRPO checkout: the defining module, a pipeline that imported the function,
    and a training script that did `from ... import sde_step_with_logprob`."""
    pkg = types.ModuleType("flow_grpo")
    patch_pkg = types.ModuleType("flow_grpo.diffusers_patch")
    defining = types.ModuleType("flow_grpo.diffusers_patch.sd3_sde_with_logprob")

    def sde_step_with_logprob(*args, **kwargs):
        return original_sde_step_with_logprob(*args, **kwargs)

    sde_step_with_logprob.__module__ = defining.__name__
    defining.sde_step_with_logprob = sde_step_with_logprob
    pipeline = types.ModuleType("flow_grpo.diffusers_patch.sd3_pipeline_with_logprob")
    pipeline.sde_step_with_logprob = sde_step_with_logprob
    script = types.ModuleType("train_sd3_script")
    script.sde_step_with_logprob = sde_step_with_logprob
    for m in (pkg, patch_pkg, defining, pipeline, script):
        monkeypatch.setitem(sys.modules, m.__name__, m)
    return defining, pipeline, script, sde_step_with_logprob


def test_patch_swaps_every_holder_and_undoes(fake_flow_grpo):
    defining, pipeline, script, original = fake_flow_grpo
    with compat.patch() as p:
        assert defining.sde_step_with_logprob is compat.sde_step_with_logprob
        assert pipeline.sde_step_with_logprob is compat.sde_step_with_logprob
        assert script.sde_step_with_logprob is compat.sde_step_with_logprob
        assert set(p.modules) >= {defining.__name__, pipeline.__name__, script.__name__}
    assert defining.sde_step_with_logprob is original and script.sde_step_with_logprob is original


def test_patch_without_flow_grpo_says_what_to_do():
    with pytest.raises(RuntimeError, match="import the flow_grpo modules"):
        compat.patch()
