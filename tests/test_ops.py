"""Every compiled backend of tempflow.ops against the pure-torch reference (tempflow.reference / tempflow.sde)."""

import pytest
import torch

from tempflow import _ext, ops, rng, sde

_GPU = torch.cuda.is_available()


def _case(backend, device):
    status = ops.backend_status(device)[backend] if (device == "cpu" or _GPU) else "no CUDA device"
    mark = pytest.mark.skipif(bool(status), reason=status)
    return pytest.param((backend, device), id=f"{backend}-{device}", marks=mark)


# every compiled backend on every device it serves: C++ on CPU, Triton through the interpreter on CPU (in CI) and
# compiled on a GPU, the hand-written CUDA kernels on a GPU
BACKENDS = [
    _case("cpu", "cpu"),
    _case("triton", "cpu"),
    _case("triton", "cuda"),
    _case("cuda", "cuda"),
]
# awkward shapes: B = 1, odd sizes, sizes that do not divide the blocks (1024 / 2048), packed 3-D tokens, video
SHAPES = {
    "b1-odd": (1, 3, 5, 7),
    "sd3-4092": (2, 4, 33, 31),
    "flux-packed": (3, 16, 64),
    "video": (2, 2, 3, 5, 7),
    "exact-block": (2, 2048),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("TEMPFLOW_POISON_OUTPUTS", "1")


def _inputs(shape, dtype, K, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype)
    v = torch.randn(shape, generator=g).to(dtype)
    noise = torch.randn((shape[0], K, *shape[1:]), generator=g)
    steps = torch.arange(shape[0]) * 3 % 9
    return x.to(device), v.to(device), noise.to(device), steps.to(device)


def _keys(b, K, device="cpu", seed=5):
    ids = torch.tensor([[[p, 0, 2, j] for j in range(K)] for p in range(b)], device=device)
    return rng.stream_keys(seed, ids)


def _table(schedule="flow-grpo", device="cpu"):
    return sde.sde_table(sde.time_grid(10, shift=3.0, device=device), schedule, 0.7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K", [1, 2, 6])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_branch_step_with_given_noise(backend, K, shape, dtype):
    backend, device = backend
    table = _table(device=device)
    x, v, noise, steps = _inputs(shape, dtype, K, device)
    for step in (steps, 4):
        ref = ops.branch_step(x, v, step, table, K, noise=noise, return_mean=True, backend="torch")
        out = ops.branch_step(x, v, step, table, K, noise=noise, return_mean=True, backend=backend)
        assert out.samples.shape == (shape[0], K, *shape[1:]) and out.log_prob.shape == (shape[0], K)
        assert out.samples.dtype == out.log_prob.dtype == out.mean.dtype == torch.float32
        assert torch.equal(out.mean, ref.mean)  # same roundings as the reference
        assert torch.equal(out.samples, ref.samples)
        torch.testing.assert_close(out.log_prob, ref.log_prob, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("schedule", ["flow-grpo", "cps", "dance"])
@pytest.mark.parametrize("shape", [SHAPES["sd3-4092"], SHAPES["flux-packed"]], ids=["sd3", "flux"])
def test_branch_step_generates_the_rng_stream(backend, schedule, shape):
    backend, device = backend
    table = _table(schedule, device)
    K = 6
    x, v, _, steps = _inputs(shape, torch.float32, K, device)
    keys = _keys(shape[0], K, device)
    ref = ops.branch_step(x, v, steps, table, K, keys=keys, backend="torch")
    out = ops.branch_step(x, v, steps, table, K, keys=keys, backend=backend)
    # the noise is tempflow.rng's stream: integers exact, log/cos to the last bits of each math library
    eps = rng.normal_from_keys(keys, shape[1:])
    recovered = (out.samples - ref.samples) / table.std[steps].reshape(-1, 1, *[1] * (len(shape) - 1))
    assert recovered.abs().max() < 1e-5 * eps.abs().max()
    torch.testing.assert_close(out.samples, ref.samples, rtol=1e-6, atol=2e-6)
    torch.testing.assert_close(out.log_prob, ref.log_prob, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [SHAPES["b1-odd"], SHAPES["sd3-4092"], SHAPES["video"]], ids=["b1", "sd3", "video"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_branch_score(backend, shape, dtype):
    backend, device = backend
    table = _table(device=device)
    K = 6
    x, v, noise, steps = _inputs(shape, dtype, K, device)
    samples = ops.branch_step(x, v, steps, table, K, noise=noise, backend="torch").samples
    ref = ops.branch_score(x, v, steps, table, samples, backend="torch")
    out = ops.branch_score(x, v, steps, table, samples, backend=backend)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-6)
    on_policy = ops.branch_step(x, v, steps, table, K, noise=noise, backend=backend).log_prob
    torch.testing.assert_close(out, on_policy, rtol=1e-6, atol=1e-6)


def _official_repeated_loss(v, x, actions, steps, table, old, adv, w, clip, beta, v_ref):
    """The official TempFlow-GRPO training code: the forward repeated for each of the K actions."""
    b, K = actions.shape[:2]
    v_rep = v.repeat_interleave(K, 0)
    x_rep = x.repeat_interleave(K, 0)
    s_rep = steps.repeat_interleave(K, 0)
    lp = sde.sde_step(x_rep, v_rep, s_rep, table, sample=actions.reshape(b * K, *x.shape[1:])).log_prob
    ratio = torch.exp(lp.view(b, K) - old)
    policy = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip, 1 + clip)) * w[:, None]
    loss = policy.mean()
    if v_ref is not None:
        kl = sde.kl_from_velocity(v_rep, v_ref.repeat_interleave(K, 0), s_rep, table).view(b, K)
        loss = loss + beta * kl.mean()
    return loss


@pytest.mark.parametrize("backend", [pytest.param(("torch", "cpu"), id="torch-cpu"), *BACKENDS])
@pytest.mark.parametrize("K", [1, 2, 6])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("with_ref", [True, False], ids=["kl", "nokl"])
def test_loss_and_gradient_equal_the_repeated_reference(backend, K, dtype, with_ref):
    backend, device = backend
    table = _table(device=device)
    shape = SHAPES["sd3-4092"]
    x, v, noise, steps = _inputs(shape, torch.float32, K, device)
    v = v.to(dtype)
    acts = ops.branch_step(x, v, steps, table, K, noise=noise, backend="torch")
    g = torch.Generator().manual_seed(1)
    old = acts.log_prob + 2e-4 * torch.randn(acts.log_prob.shape, generator=g).to(device)  # some ratios clip
    adv = torch.randn(old.shape, generator=g).to(device)
    w = torch.rand(shape[0], generator=g).to(device) + 0.5
    v_ref = (v.float() + 0.05 * torch.randn(shape, generator=g).to(device)).to(dtype) if with_ref else None
    beta = 0.004 if with_ref else 0.0
    args = (x, acts.samples, steps, table, old, adv, w, 1e-4, beta, v_ref)

    v_ours = v.detach().clone().requires_grad_(True)
    loss = ops.branch_grpo_loss(v_ours, *args, backend=backend)
    loss.backward()
    v_off = v.detach().clone().requires_grad_(True)
    want = _official_repeated_loss(v_off, *args)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-7)
    assert v_ours.grad.dtype == dtype
    # the reference's gradient is rounded to v's dtype too: allow two of its roundings, subnormals included
    tol = 2 * torch.finfo(dtype).eps
    scale = v_off.grad.float().abs().max()
    tiny = 2 * torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    torch.testing.assert_close(v_ours.grad.float(), v_off.grad.float(), rtol=tol, atol=tol * scale + tiny)
    assert scale > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_alone(backend):
    backend, device = backend
    table = _table(device=device)
    x, v, noise, steps = _inputs(SHAPES["video"], torch.float32, 2, device)
    v_ref = v + 0.1
    acts = ops.branch_step(x, v, steps, table, 2, noise=noise, backend="torch").samples
    _, kl = ops.branch_logp_kl(v, x, acts, steps, table, v_ref, backend=backend)
    torch.testing.assert_close(kl, sde.kl_from_velocity(v, v_ref, steps, table), rtol=1e-5, atol=1e-9)
    _, zero = ops.branch_logp_kl(v, x, acts, steps, table, v, backend=backend)
    assert torch.equal(zero, torch.zeros_like(zero))


def test_cpu_results_do_not_depend_on_thread_count():
    if not _ext.load("_C")[0]:
        pytest.skip("C++ extension not built")
    table = _table()
    x, v, _, steps = _inputs((3, 16, 64, 64), torch.float32, 6)
    keys = _keys(3, 6)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.branch_step(x, v, steps, table, 6, keys=keys, backend="cpu")
        torch.set_num_threads(max(2, threads))
        many = ops.branch_step(x, v, steps, table, 6, keys=keys, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one.samples, many.samples) and torch.equal(one.log_prob, many.log_prob)


def test_torch_compile_traces_the_ops():
    if not _ext.load("_C")[0]:
        pytest.skip("C++ extension not built")
    table = _table()
    x, v, noise, steps = _inputs(SHAPES["sd3-4092"], torch.float32, 2)
    keys = _keys(2, 2)
    old = torch.zeros(2, 2)
    adv = torch.tensor([[1.0, -1.0], [0.5, -0.5]])

    def fn(v):
        acts = ops.branch_step(x, v.detach(), steps, table, 2, keys=keys)
        return ops.branch_grpo_loss(v, x, acts.samples, steps, table, acts.log_prob.detach(), adv, None, 1e-4)

    v1, v2 = v.clone().requires_grad_(True), v.clone().requires_grad_(True)
    eager = fn(v1)
    eager.backward()
    compiled = torch.compile(fn, fullgraph=True)(v2)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(v2.grad, v1.grad)
    del old


def test_bad_input():
    table = _table()
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="exactly one of noise"):
        ops.branch_step(x, x, 0, table, 2)
    with pytest.raises(ValueError, match="shapes differ"):
        ops.branch_step(x, torch.randn(2, 3, 5), 0, table, 2, noise=torch.randn(2, 2, 3, 4))
    with pytest.raises(ValueError, match="noise has 2 branches"):
        ops.branch_step(x, x, 0, table, 3, noise=torch.randn(2, 2, 3, 4))
    with pytest.raises(ValueError, match=r"must be \(B, K, \.\.\.\)"):
        ops.branch_step(x, x, 0, table, 2, noise=torch.randn(2, 2, 3, 5))
    with pytest.raises(ValueError, match="keys must be int64"):
        ops.branch_step(x, x, 0, table, 2, keys=torch.zeros(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="beta = 0.1 needs v_ref"):
        ops.branch_grpo_loss(x, x, x[:, None], 0, table, torch.zeros(2, 1), torch.zeros(2, 1), None, 0.1, 0.1)
    if _ext.load("_C")[0]:
        with pytest.raises(RuntimeError, match="coef_x must have shape"):
            torch.ops.tempflow_cpu.branch_logp(
                torch.randn(2, 5), torch.randn(2, 5), torch.randn(2, 1, 5), torch.zeros(3), torch.zeros(2), None
            )
        with pytest.raises(RuntimeError, match="must be float32, bfloat16 or float16"):
            torch.ops.tempflow_cpu.branch_logp(
                torch.zeros(2, 5, dtype=torch.int32), torch.zeros(2, 5), torch.zeros(2, 1, 5), torch.ones(2),
                torch.ones(2), None,
            )  # fmt: skip
