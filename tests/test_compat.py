"""tempflow.compat against faithful copies of the peers' functions (tempflow/compat/flow_grpo_eager.py and
tests/peers/): the same numbers to fp32 rounding, the same shapes and dtypes, the same noise from the same generator
(the generator left in the same state), the same errors; and patch() replacing only its own peer's functions."""

import sys
import types

import pytest
import torch

from tempflow import ops
from tempflow.compat import _core
from tempflow.compat import flow_grpo as compat
from tempflow.compat import tempflow_grpo as tcompat
from tempflow.compat.flow_grpo_eager import eager_sde_step_with_logprob as original_sde_step_with_logprob

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from peers import loader  # noqa: E402

diffusers = pytest.importorskip("diffusers")

PERSTEP = loader.load("tempflow_grpo", "sd3_sde_with_logprob_perstep").sde_step_with_logprob
SCORER = loader.load("tempflow_grpo", "sd3_sde_with_logprob").sde_step_with_logprob
FLOW_GRPO = loader.load("flow_grpo", "sd3_sde_with_logprob").sde_step_with_logprob


def _backend(name):
    status = ops.backend_status("cpu")[name]
    return pytest.param(name, id=name, marks=pytest.mark.skipif(bool(status), reason=status))


# the fused kernels tempflow.compat runs on (C++ here; Triton through its interpreter) and the pure-torch fallback
BACKENDS = [_backend("cpu"), _backend("triton"), _backend("torch")]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("TEMPFLOW_BACKEND", request.param)
    return request.param


def scheduler(steps=10, shift=3.0):
    s = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    s.set_timesteps(steps)
    return s


def assert_same(ours, theirs, fp32=True):
    """Same length, shapes and dtypes; values within fp32 rounding (NaN where the original has NaN)."""
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        name = ["prev_sample", "log_prob", "mean", "std", "sqrt_dt"][i]
        assert a.shape == b.shape, (name, a.shape, b.shape)
        assert a.dtype == b.dtype, (name, a.dtype, b.dtype)
        if fp32:
            assert a.dtype == torch.float32, name
        finite = torch.isfinite(b)
        scale = max(float(b[finite].abs().max()) if finite.any() else 0.0, 1.0)
        torch.testing.assert_close(a, b, rtol=4e-6, atol=4e-6 * scale, equal_nan=True, msg=name)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def same_state(g1, g2):
    return torch.equal(g1.get_state(), g2.get_state())


SHAPES = [(4, 16, 8, 8), (3, 64, 12), (2, 4, 3, 6, 6)]
SHAPE_IDS = ["sd3", "flux", "video"]

# ---------------------------------------------------------------------------------------------------------------
# Flow-GRPO
# ---------------------------------------------------------------------------------------------------------------


def test_the_two_flow_grpo_copies_agree():
    s = scheduler()
    x, v = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    for sde_type in ("sde", "cps"):
        a = original_sde_step_with_logprob(s, v, s.timesteps[[1, 4]], x, 0.7, generator=gen(1), sde_type=sde_type)
        b = FLOW_GRPO(s, v, s.timesteps[[1, 4]], x, 0.7, generator=gen(1), sde_type=sde_type)
        for p, q in zip(a, b, strict=True):
            assert torch.equal(p, q)


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_matches_flow_grpo_with_generator(sde_type, shape, backend):
    s = scheduler()
    x, v = torch.randn(shape), torch.randn(shape)
    for k in range(10):
        ts = s.timesteps[[k] * shape[0]]
        g1, g2 = gen(k), gen(k)
        theirs = original_sde_step_with_logprob(s, v, ts, x, 0.7, generator=g1, sde_type=sde_type, return_sqrt_dt=True)
        ours = compat.sde_step_with_logprob(s, v, ts, x, 0.7, generator=g2, sde_type=sde_type, return_sqrt_dt=True)
        assert_same(ours, theirs)
        assert same_state(g1, g2)
        # the same generator gives the same noise, bit for bit
        std = ours[4] * ours[3] if sde_type == "sde" else ours[3]
        noise_theirs = torch.randn(shape, generator=gen(k))
        if k < 9 or sde_type == "sde":
            recovered = (ours[0] - ours[2]) / std
            torch.testing.assert_close(recovered, noise_theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_matches_flow_grpo_scoring_given_samples(sde_type, backend):
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
    after_theirs = torch.randn(3)
    torch.manual_seed(123)
    ours = compat.sde_step_with_logprob(s, v, s.timesteps[:1], x)
    assert_same(ours, theirs)
    assert torch.equal(torch.randn(3), after_theirs)


def test_list_of_generators():
    s = scheduler()
    x, v = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    gens = lambda: [gen(i) for i in range(3)]  # noqa: E731
    theirs = original_sde_step_with_logprob(s, v, s.timesteps[[1, 1, 1]], x, generator=gens())
    ours = compat.sde_step_with_logprob(s, v, s.timesteps[[1, 1, 1]], x, generator=gens())
    assert_same(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_model_output_is_upcast(dtype, backend):
    s = scheduler()
    x, v = torch.randn(2, 4, 6, 6).to(dtype), torch.randn(2, 4, 6, 6).to(dtype)
    prev = torch.randn(2, 4, 6, 6).to(dtype)
    theirs = original_sde_step_with_logprob(s, v, s.timesteps[[3, 3]], x, prev_sample=prev)
    ours = compat.sde_step_with_logprob(s, v, s.timesteps[[3, 3]], x, prev_sample=prev)
    assert_same(ours, theirs)
    theirs = original_sde_step_with_logprob(s, v, s.timesteps[[3, 3]], x, generator=gen(4))
    ours = compat.sde_step_with_logprob(s, v, s.timesteps[[3, 3]], x, generator=gen(4))
    assert_same(ours, theirs)


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_return_shapes_follow_the_timestep(sde_type):
    """std_dev_t and sqrt(-dt) have one row per timestep value, as Flow-GRPO's: (1, 1, ..., 1) for one value."""
    s = scheduler()
    x, v = torch.randn(4, 16, 8, 8), torch.randn(4, 16, 8, 8)
    for ts in (s.timesteps[2:3], s.timesteps[[2, 2, 5, 7]]):
        theirs = original_sde_step_with_logprob(s, v, ts, x, generator=gen(0), sde_type=sde_type, return_sqrt_dt=True)
        ours = compat.sde_step_with_logprob(s, v, ts, x, generator=gen(0), sde_type=sde_type, return_sqrt_dt=True)
        assert [tuple(t.shape) for t in ours] == [tuple(t.shape) for t in theirs]
        assert ours[3].shape == ours[4].shape == (len(ts), 1, 1, 1)
        assert_same(ours, theirs)
    out4 = compat.sde_step_with_logprob(s, v, s.timesteps[2:3], x)
    assert len(out4) == 4 and out4[1].shape == (4,)
    assert_same(out4[3:], (original_sde_step_with_logprob(s, v, s.timesteps[2:3], x)[3],))


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
@pytest.mark.parametrize("mode", ["generator", "global", "given"])
def test_noise_level_zero_is_the_deterministic_step(sde_type, mode, backend):
    """Flow-GRPO's evaluation: noise_level=0 gives the Euler step (sde), draws (and discards) the noise as the
    original does, and returns the original's non-finite (sde) or zero (cps) log-prob."""
    s = scheduler()
    x, v, prev = torch.randn(3, 4, 6, 6), torch.randn(3, 4, 6, 6), torch.randn(3, 4, 6, 6)
    for k in (0, 4, 9):
        ts = s.timesteps[[k]]
        kwargs = {"sde_type": sde_type, "return_sqrt_dt": True}
        if mode == "given":
            kwargs["prev_sample"] = prev
        g1, g2 = (gen(k), gen(k)) if mode == "generator" else (None, None)
        torch.manual_seed(5)
        theirs = original_sde_step_with_logprob(s, v, ts, x, 0, generator=g1, **kwargs)
        after_theirs = torch.randn(2)
        torch.manual_seed(5)
        ours = compat.sde_step_with_logprob(s, v, ts, x, 0, generator=g2, **kwargs)
        assert torch.equal(torch.randn(2), after_theirs)
        if g1 is not None:
            assert same_state(g1, g2)
        assert_same(ours, theirs)
        assert torch.equal(ours[3], torch.zeros(1, 1, 1, 1))
        if sde_type == "sde":
            assert torch.isnan(ours[1]).all() and torch.isnan(theirs[1]).all()
            euler = x + (s.sigmas[k + 1] - s.sigmas[k]) * v
            assert torch.equal(ours[2], euler) and torch.equal(theirs[2], euler)
            if mode != "given":
                assert torch.equal(ours[0], euler)
    with pytest.raises(ValueError, match="noise_level"):
        compat.sde_step_with_logprob(s, v, s.timesteps[:1], x, -0.1)


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
    theirs = original_sde_step_with_logprob(s, v, s.timesteps[[4, 4]], x, generator=gen(0))
    ours = compat.sde_step_with_logprob(s, v, s.timesteps[[4, 4]], x, generator=gen(0))
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

    for g in (gen(3), [gen(i) for i in range(2)]):
        a = compat.randn_tensor((2, 3, 4), generator=g, device=torch.device("cpu"), dtype=torch.float32)
        gen2 = [gen(i) for i in range(2)] if isinstance(g, list) else gen(3)
        b = randn_tensor((2, 3, 4), generator=gen2, device=torch.device("cpu"), dtype=torch.float32)
        assert torch.equal(a, b)
    a = compat.randn_tensor((5, 7), generator=gen(2), device=torch.device("cpu"), dtype=torch.bfloat16)
    assert torch.equal(a, randn_tensor((5, 7), generator=gen(2), device=torch.device("cpu"), dtype=torch.bfloat16))


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_training_gradients_match(sde_type):
    """Training scores given samples with the velocity requiring grad: the gradients of the log-prob and of the mean
    (the KL term uses it) are the original's."""
    s = scheduler()
    x, prev = torch.randn(3, 4, 6, 6), torch.randn(3, 4, 6, 6)
    v0 = torch.randn(3, 4, 6, 6)
    ts = s.timesteps[[1, 5, 8]]
    grads = []
    for fn in (original_sde_step_with_logprob, compat.sde_step_with_logprob):
        v = v0.clone().requires_grad_(True)
        _, lp, mean, _ = fn(s, v, ts, x, 0.7, prev_sample=prev, sde_type=sde_type)
        (lp.sum() + (mean**2).mean()).backward()
        grads.append(v.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# TempFlow-GRPO
# ---------------------------------------------------------------------------------------------------------------

# (latents, velocity): the peers' pipelines pass fp32 latents; the velocity may be bf16 (the noise is then bf16 too)
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)]
DTYPE_IDS = ["fp32", "bf16", "fp32-latents-bf16-velocity"]


@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_perstep_matches_tempflow_grpo_with_generator(shape, dtypes, backend):
    """K = 6 branches per item, rows b*6 + j, the noise drawn with randn_tensor((B*6, ...), dtype of the velocity)
    from the same generator (left in the same state), the mean repeated, the 4th output std_dev_t * sqrt(-dt)."""
    s = scheduler()
    x, v = torch.randn(shape).to(dtypes[0]), torch.randn(shape).to(dtypes[1])
    B = shape[0]
    for k in range(10):
        ts = s.timesteps[[k]]
        g1, g2 = gen(k), gen(k)
        theirs = PERSTEP(s, v, ts, x, generator=g1)
        ours = tcompat.sde_step_with_logprob_perstep(s, v, ts, x, generator=g2)
        assert_same(ours, theirs)
        assert same_state(g1, g2)
        assert ours[0].shape == (B * 6, *shape[1:]) and ours[1].shape == (B * 6,)
        assert ours[3].shape == (1,) * len(shape)
        noise = loader.load("tempflow_grpo", "sd3_sde_with_logprob_perstep").randn_tensor(
            [B * 6, *shape[1:]], generator=gen(k), device=v.device, dtype=dtypes[1]
        )
        recovered = (ours[0] - ours[2]) / ours[3]
        torch.testing.assert_close(recovered, noise.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
def test_perstep_deterministic_is_the_euler_step(dtypes, backend):
    s = scheduler()
    x, v = torch.randn(6, 4, 6, 6).to(dtypes[0]), torch.randn(6, 4, 6, 6).to(dtypes[1])
    for ts in (s.timesteps[[3]], s.timesteps[[0, 1, 2, 3, 4, 9]]):
        theirs = PERSTEP(s, v, ts, x, determistic=True)
        ours = tcompat.sde_step_with_logprob_perstep(s, v, ts, x, determistic=True)
        assert_same(ours, theirs)
        assert torch.equal(ours[0], theirs[0])  # sample + dt * model_output, bit for bit
        assert ours[3].shape == (len(ts), 1, 1, 1)


def test_perstep_uses_the_global_stream_and_ignores_prev_sample():
    s = scheduler()
    x, v, prev = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    torch.manual_seed(9)
    theirs = PERSTEP(s, v, s.timesteps[[2]], x, prev_sample=prev)
    after = torch.randn(3)
    torch.manual_seed(9)
    ours = tcompat.sde_step_with_logprob_perstep(s, v, s.timesteps[[2]], x, prev_sample=prev)
    assert torch.equal(torch.randn(3), after)
    assert_same(ours, theirs)


def test_perstep_errors_are_the_originals():
    s = scheduler()
    x = torch.randn(3, 4, 6, 6)
    for fn in (PERSTEP, tcompat.sde_step_with_logprob_perstep):
        with pytest.raises(ValueError, match="Cannot pass both generator and prev_sample"):
            fn(s, x, s.timesteps[[1]], x, prev_sample=x, generator=gen(0))
        # B timestep values cannot broadcast against B*6 branch rows
        with pytest.raises(RuntimeError):
            fn(s, x, s.timesteps[[1, 2, 3]], x, generator=gen(0))
    with pytest.raises(RuntimeError, match=r"t.unsqueeze\(0\)"):
        tcompat.sde_step_with_logprob_perstep(s, x, s.timesteps[[1, 2, 3]], x)
    # one item: its single timestep value broadcasts, in the original too
    assert_same(
        tcompat.sde_step_with_logprob_perstep(s, x[:1], s.timesteps[[4]], x[:1], generator=gen(1)),
        PERSTEP(s, x[:1], s.timesteps[[4]], x[:1], generator=gen(1)),
    )


def _edited_perstep(noise_level, k, name="edited_checkout.sd3_sde_with_logprob_perstep"):
    """TempFlow-GRPO's per-step module with its constants edited (FLUX's 0.9, another K), as a user would."""
    src = loader.source("tempflow_grpo", "sd3_sde_with_logprob_perstep")
    assert src.count(")) * 0.7") == 1 and src.count("num_samples = 6") == 1
    src = src.replace(")) * 0.7", f")) * {noise_level}").replace("num_samples = 6", f"num_samples = {k}")
    mod = types.ModuleType(name)
    exec(compile(src, name, "exec"), mod.__dict__)
    mod.sde_step_with_logprob.__module__ = name
    return mod


def test_perstep_noise_level_and_k_are_arguments():
    s = scheduler()
    x, v = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    edited = _edited_perstep(0.9, 3).sde_step_with_logprob
    for det in (False, True):
        theirs = edited(s, v, s.timesteps[[5]], x, generator=gen(2), determistic=det)
        ours = tcompat.sde_step_with_logprob_perstep(
            s, v, s.timesteps[[5]], x, generator=gen(2), determistic=det, noise_level=0.9, num_samples=3
        )
        assert_same(ours, theirs)
    assert tcompat.sde_step_with_logprob_perstep(s, v, s.timesteps[[5]], x, num_samples=1)[0].shape == x.shape


@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
def test_scorer_matches_tempflow_grpo(dtypes, backend):
    """Per-sample timesteps and given samples (training), draws with a generator (its pipeline), determistic with
    and without a given sample (its evaluation draws, then discards, the noise)."""
    s = scheduler()
    B = 5
    x, v, prev = (torch.randn(B, 4, 6, 6).to(dt) for dt in (dtypes[0], dtypes[1], dtypes[1]))
    ts = s.timesteps[torch.tensor([0, 2, 2, 7, 8])]
    ours = tcompat.sde_step_with_logprob(s, v, ts, x, prev_sample=prev)
    assert_same(ours, SCORER(s, v, ts, x, prev_sample=prev), fp32=False)
    assert ours[0] is prev
    g1, g2 = gen(3), gen(3)
    assert_same(tcompat.sde_step_with_logprob(s, v, ts, x, generator=g2), SCORER(s, v, ts, x, generator=g1))
    assert same_state(g1, g2)
    for given in (None, prev):
        torch.manual_seed(11)
        theirs = SCORER(s, v, ts, x, prev_sample=given, determistic=True)
        after = torch.randn(3)
        torch.manual_seed(11)
        ours = tcompat.sde_step_with_logprob(s, v, ts, x, prev_sample=given, determistic=True)
        assert torch.equal(torch.randn(3), after)
        assert_same(ours, theirs)
        assert torch.equal(ours[0], theirs[0])
    with pytest.raises(ValueError, match="Cannot pass both generator and prev_sample"):
        tcompat.sde_step_with_logprob(s, v, ts, x, prev_sample=prev, generator=gen(0))


def test_scorer_training_gradients_match():
    s = scheduler()
    x, prev, v0 = torch.randn(3, 4, 6, 6), torch.randn(3, 4, 6, 6), torch.randn(3, 4, 6, 6)
    ts = s.timesteps[[0, 4, 8]]
    grads, outs = [], []
    for fn in (SCORER, tcompat.sde_step_with_logprob):
        v = v0.clone().requires_grad_(True)
        out = fn(s, v, ts, x, prev_sample=prev)
        # TempFlow-GRPO's loss: the policy term times 2.25 * std_dev_t (its 4th output) and the KL of the means
        (-(2.25 * out[3].reshape(-1) * out[1]).sum() + ((out[2] - 0.5) ** 2).mean()).backward()
        grads.append(v.grad)
        outs.append([t.detach() for t in out])
    assert_same(outs[1], outs[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


def test_fused_and_torch_paths_agree(monkeypatch):
    """The fused path (auto) and the pure-torch fallback give the same numbers and the same mean bit for bit."""
    s = scheduler()
    x, v, prev = torch.randn(4, 16, 8, 8), torch.randn(4, 16, 8, 8), torch.randn(4, 16, 8, 8)
    ts = s.timesteps[[1, 3, 3, 6]]
    calls = [
        lambda: compat.sde_step_with_logprob(s, v, ts, x, 0.7, prev_sample=prev),
        lambda: compat.sde_step_with_logprob(s, v, ts, x, 0.7, generator=gen(0)),
        lambda: tcompat.sde_step_with_logprob_perstep(s, v, ts[:1], x, generator=gen(0)),
        lambda: tcompat.sde_step_with_logprob_perstep(s, v.bfloat16(), ts[:1], x, generator=gen(0)),
        lambda: tcompat.sde_step_with_logprob(s, v.bfloat16(), ts, x, generator=gen(0)),
        lambda: tcompat.sde_step_with_logprob_perstep(s, v, ts, x, determistic=True),
        lambda: tcompat.sde_step_with_logprob(s, v, ts, x, prev_sample=prev),
    ]
    for call in calls:
        fused = call()
        monkeypatch.setenv("TEMPFLOW_BACKEND", "torch")
        plain = call()
        monkeypatch.delenv("TEMPFLOW_BACKEND")
        assert_same(fused, plain)
        assert torch.equal(fused[2], plain[2])
    cx, cv = torch.rand(4), torch.rand(4)
    ref = x * cx.view(-1, 1, 1, 1) + v.bfloat16().float() * cv.view(-1, 1, 1, 1)
    assert torch.equal(_core.affine(x, v.bfloat16(), cx, cv), ref)


# ---------------------------------------------------------------------------------------------------------------
# patch()
# ---------------------------------------------------------------------------------------------------------------


class Transformer:
    """A stand-in velocity model: deterministic in (latents, timestep)."""

    def __call__(self, latents, timestep):
        return -0.5 * latents + 1e-3 * timestep.float().view(-1, *([1] * (latents.dim() - 1)))


def pipeline():
    return types.SimpleNamespace(scheduler=scheduler(), transformer=Transformer())


@pytest.fixture
def flow_grpo_checkout(monkeypatch):
    """An imported Flow-GRPO checkout, and a training script that did `from ... import sde_step_with_logprob`."""
    with loader.checkout("flow_grpo") as mods:
        script = types.ModuleType("train_sd3_script")
        script.sde_step_with_logprob = mods["flow_grpo.diffusers_patch.sd3_sde_with_logprob"].sde_step_with_logprob
        monkeypatch.setitem(sys.modules, script.__name__, script)
        yield mods, script


@pytest.fixture
def tempflow_grpo_checkout(monkeypatch):
    """An imported TempFlow-GRPO checkout (package also named flow_grpo) and its training script, which imports the
    scorer."""
    with loader.checkout("tempflow_grpo") as mods:
        script = types.ModuleType("train_sd3_pr_script")
        script.sde_step_with_logprob = mods["flow_grpo.diffusers_patch.sd3_sde_with_logprob"].sde_step_with_logprob
        monkeypatch.setitem(sys.modules, script.__name__, script)
        yield mods, script


def test_patch_swaps_every_holder_and_undoes(flow_grpo_checkout):
    mods, script = flow_grpo_checkout
    defining = mods["flow_grpo.diffusers_patch.sd3_sde_with_logprob"]
    pipe = mods["flow_grpo.diffusers_patch.sd3_pipeline_with_logprob"]
    original = defining.sde_step_with_logprob
    with compat.patch() as p:
        for m in (defining, pipe, script):
            assert m.sde_step_with_logprob is compat.sde_step_with_logprob
        assert set(p.modules) == {defining.__name__, pipe.__name__, script.__name__}
        assert p.skipped == []
        assert compat.patch().replaced == []  # a second patch finds nothing left to replace
    assert defining.sde_step_with_logprob is original and script.sde_step_with_logprob is original
    assert pipe.sde_step_with_logprob is original


def test_patched_flow_grpo_pipeline_evaluates_with_noise_level_zero(flow_grpo_checkout):
    """Flow-GRPO's evaluation calls its pipeline with noise_level=0: patched, it runs and gives the same images."""
    mods, _ = flow_grpo_checkout
    run = mods["flow_grpo.diffusers_patch.sd3_pipeline_with_logprob"].pipeline_with_logprob
    latents = torch.randn(2, 4, 8, 8)
    for noise_level in (0.0, 0.7):
        torch.manual_seed(1)
        theirs = run(pipeline(), latents, 10, noise_level=noise_level)
        with compat.patch():
            torch.manual_seed(1)
            ours = run(pipeline(), latents, 10, noise_level=noise_level)
        if noise_level == 0:
            assert torch.equal(ours[0], theirs[0])  # the Euler steps, bit for bit
            assert all(torch.isnan(lp).all() for lp in ours[2])
        torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-5)
        for a, b in zip(ours[2], theirs[2], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_flow_grpo_patch_leaves_tempflow_grpo_alone(tempflow_grpo_checkout):
    mods, script = tempflow_grpo_checkout
    before = {name: m.sde_step_with_logprob for name, m in mods.items()}
    with pytest.raises(RuntimeError, match="none of the imported functions") as err:
        compat.patch()
    assert "per-step function" in str(err.value) and "patch_perstep()" in str(err.value)
    assert "training-time scorer" in str(err.value) and "patch_scorer()" in str(err.value)
    assert {name: m.sde_step_with_logprob for name, m in mods.items()} == before
    assert script.sde_step_with_logprob is before["flow_grpo.diffusers_patch.sd3_sde_with_logprob"]


def test_tempflow_patches_replace_only_their_own_function(tempflow_grpo_checkout):
    mods, script = tempflow_grpo_checkout
    scorer_mod = mods["flow_grpo.diffusers_patch.sd3_sde_with_logprob"]
    perstep_mod = mods["flow_grpo.diffusers_patch.sd3_sde_with_logprob_perstep"]
    pipe_mod = mods["flow_grpo.diffusers_patch.sd3_pipeline_with_logprob_perstep"]
    scorer, perstep = scorer_mod.sde_step_with_logprob, perstep_mod.sde_step_with_logprob
    with tcompat.patch_perstep() as p:
        assert perstep_mod.sde_step_with_logprob is tcompat.sde_step_with_logprob_perstep
        assert pipe_mod.sde_step_with_logprob is tcompat.sde_step_with_logprob_perstep
        assert scorer_mod.sde_step_with_logprob is scorer and script.sde_step_with_logprob is scorer
        assert [w for w, _ in p.skipped] == [f"{scorer.__module__}.sde_step_with_logprob"]
    with tcompat.patch_scorer():
        assert scorer_mod.sde_step_with_logprob is tcompat.sde_step_with_logprob
        assert script.sde_step_with_logprob is tcompat.sde_step_with_logprob
        assert perstep_mod.sde_step_with_logprob is perstep and pipe_mod.sde_step_with_logprob is perstep
    with tcompat.patch():
        assert scorer_mod.sde_step_with_logprob is tcompat.sde_step_with_logprob
        assert pipe_mod.sde_step_with_logprob is tcompat.sde_step_with_logprob_perstep
    assert scorer_mod.sde_step_with_logprob is scorer and pipe_mod.sde_step_with_logprob is perstep


def test_tempflow_patches_refuse_flow_grpo(flow_grpo_checkout):
    mods, script = flow_grpo_checkout
    before = {name: m.sde_step_with_logprob for name, m in mods.items()}
    for fn in (tcompat.patch_perstep, tcompat.patch_scorer, tcompat.patch):
        with pytest.raises(RuntimeError, match="Flow-GRPO's step") as err:
            fn()
        assert "tempflow.compat.flow_grpo.patch()" in str(err.value)
    assert {name: m.sde_step_with_logprob for name, m in mods.items()} == before


def test_patched_tempflow_pipeline_gives_the_same_branches(tempflow_grpo_checkout):
    mods, _ = tempflow_grpo_checkout
    run = mods["flow_grpo.diffusers_patch.sd3_pipeline_with_logprob_perstep"].pipeline_with_logprob
    latents = torch.randn(2, 4, 8, 8)
    torch.manual_seed(3)
    theirs = run(pipeline(), latents, 6)
    with tcompat.patch_perstep():
        torch.manual_seed(3)
        ours = run(pipeline(), latents, 6)
    assert torch.equal(ours[0], theirs[0])  # the ODE trajectory, bit for bit
    for a, b in zip(ours[1:], theirs[1:], strict=True):
        for p, q in zip(a, b, strict=True):
            assert p.shape == q.shape
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)


def test_patch_keeps_an_edited_checkouts_settings(monkeypatch):
    """A checkout edited for FLUX (0.9) with another K: patch_perstep reads both from the function it replaces."""
    mod = _edited_perstep(0.9, 3)
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    original = mod.sde_step_with_logprob
    s = scheduler()
    x, v = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    with tcompat.patch_perstep():
        replaced = mod.sde_step_with_logprob
        assert replaced is not original and replaced.settings == {"noise_level": 0.9, "num_samples": 3}
        assert_same(
            replaced(s, v, s.timesteps[[2]], x, generator=gen(0)), original(s, v, s.timesteps[[2]], x, generator=gen(0))
        )
    assert mod.sde_step_with_logprob is original


def test_patch_refuses_lookalikes(monkeypatch):
    """Same name and signature, other behaviour (a 4th output that includes sqrt(-dt)); or a wrapper whose signature
    says nothing: left alone, and the error says why."""

    def sde_step_with_logprob(
        self, model_output, timestep, sample, noise_level=0.7, prev_sample=None, generator=None, sde_type="sde"
    ):
        out = FLOW_GRPO(self, model_output, timestep, sample, noise_level, prev_sample, generator, sde_type, True)
        return out[0], out[1], out[2], out[3] * out[4]

    def wrapper(*args, **kwargs):
        return FLOW_GRPO(*args, **kwargs)

    a, b = types.ModuleType("lookalike_a"), types.ModuleType("lookalike_b")
    a.sde_step_with_logprob, b.sde_step_with_logprob = sde_step_with_logprob, wrapper
    for m in (a, b):
        monkeypatch.setitem(sys.modules, m.__name__, m)
    with pytest.raises(RuntimeError) as err:
        compat.patch()
    assert "not its numbers: 4th output differs" in str(err.value)
    assert "neither Flow-GRPO's nor TempFlow-GRPO's" in str(err.value)
    assert a.sde_step_with_logprob is sde_step_with_logprob and b.sde_step_with_logprob is wrapper


def test_patch_probe_leaves_the_global_rng_alone(tempflow_grpo_checkout):
    from tempflow.compat import _patch

    _patch._IDENTITIES.clear()
    torch.manual_seed(4)
    expected = torch.randn(3)
    torch.manual_seed(4)
    tcompat.patch().undo()
    assert torch.equal(torch.randn(3), expected)


def test_patch_without_flow_grpo_says_what_to_do():
    with pytest.raises(RuntimeError, match="import the flow_grpo modules"):
        compat.patch()
