"""One adapter test suite for every model: the tiny random-weight SD3 and FLUX pipelines of tempflow.models.tiny
(built offline), and the embedded digits model."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from tempflow import sde  # noqa: E402
from tempflow.models import digits as dg  # noqa: E402
from tempflow.models.diffusers_models import FluxModel, SD3Model, set_attention  # noqa: E402
from tempflow.models.tiny import flux_pipeline, sd3_pipeline  # noqa: E402


@pytest.fixture(params=["sd3", "flux", "digits"])
def adapter(request, tmp_path):
    if request.param == "sd3":
        return SD3Model.from_pipeline(sd3_pipeline(tmp_path, t5=False), height=32, width=32)
    if request.param == "flux":  # 16 T5 tokens keep the tiny test fast (the default is 128, as both codebases)
        return FluxModel.from_pipeline(flux_pipeline(tmp_path), height=16, width=16, max_sequence_length=16)
    torch.manual_seed(0)
    return dg.DigitsModel(dg.DigitsConfig(num_layers=1, attention_head_dim=8, num_attention_heads=2, text_dim=16))


def test_conditioning_is_encoded_once_and_gathered(adapter):
    cond = adapter.encode(["a cat", "a dog", "a bird"])
    assert len(cond) == 3
    rows = cond.select(torch.tensor([2, 0, 2]))
    for k in rows:
        assert torch.equal(rows[k][0], cond.cond[k][2]) and torch.equal(rows[k][1], cond.cond[k][0])
        assert cond.unconditional(4)[k].shape[0] == 4


def test_velocity_shapes_cfg_and_per_sample_times(adapter):
    cond = adapter.encode(["a cat", "a dog"])
    x = torch.randn(3, *adapter.latent_shape)
    index = torch.tensor([0, 1, 1])
    t = torch.tensor([0.9, 0.4, 0.1])
    with torch.no_grad():
        v = adapter.velocity(x, t, cond, index, guidance=2.5)
        assert v.shape == x.shape and torch.isfinite(v).all()
        one = torch.cat([adapter.velocity(x[i : i + 1], t[i], cond, index[i : i + 1], 2.5) for i in range(3)])
    torch.testing.assert_close(v.float(), one.float(), rtol=1e-4, atol=1e-4)


def test_sampling_and_decoding_end_to_end(adapter):
    grid = adapter.time_grid(4)
    assert isinstance(grid, sde.TimeGrid)
    cond = adapter.encode(["a cat", "a dog"])
    index = torch.tensor([0, 1])
    x = torch.randn(2, *adapter.latent_shape)
    with torch.no_grad():
        for k in range(4):
            x = sde.ode_step(x, adapter.velocity(x, grid.sigmas[k], cond, index), k, grid)
        images = adapter.decode(x)
    assert images.dim() == 4 and images.shape[0] == 2 and images.shape[1] in (1, 3)
    assert images.min() >= 0 and images.max() <= 1


def test_gradients_reach_the_trainable_parameters(adapter):
    cond = adapter.encode(["a cat"])
    x = torch.randn(2, *adapter.latent_shape)
    adapter.velocity(x, 0.5, cond, torch.zeros(2, dtype=torch.long), 1.0).float().square().mean().backward()
    params = list(adapter.trainable_parameters())
    assert params and sum(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params) > len(params) // 2


def test_lora_trains_only_adapters_and_the_reference_is_the_base(adapter):
    pytest.importorskip("peft")
    cond = adapter.encode(["a cat"])
    x = torch.randn(2, *adapter.latent_shape)
    index = torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        before = adapter.velocity(x, 0.5, cond, index, 2.0)
    full = len(list(adapter.trainable_parameters()))
    adapter.use_lora(rank=4, alpha=8)
    params = list(adapter.trainable_parameters())
    assert 0 < len(params) < full + 100
    names = [n for n, p in adapter.trained_module().named_parameters() if p.requires_grad]
    assert names and all("lora" in n for n in names)
    with torch.no_grad():
        torch.testing.assert_close(adapter.velocity(x, 0.5, cond, index, 2.0), before)  # adapters start at zero
        for p in params:
            p.add_(0.05)
        moved = adapter.velocity(x, 0.5, cond, index, 2.0)
        with adapter.reference():
            base = adapter.velocity(x, 0.5, cond, index, 2.0)
    assert not torch.allclose(moved, before)
    torch.testing.assert_close(base, before)


def test_sd3_precomputed_embeddings_and_local_folder(tmp_path):
    pipe = sd3_pipeline(tmp_path)
    from_pipe = SD3Model.from_pipeline(pipe, height=32, width=32)
    cond = from_pipe.encode(["a cat", ""])
    embeddings = {"a cat": (cond.cond["hidden"][0], cond.cond["pooled"][0]),
                  "": (cond.cond["hidden"][1], cond.cond["pooled"][1])}  # fmt: skip
    pre = SD3Model(pipe.transformer, pipe.vae, embeddings=embeddings, height=32, width=32)
    x = torch.randn(1, *pre.latent_shape)
    with torch.no_grad():
        a = pre.velocity(x, 0.5, pre.encode(["a cat"]), torch.zeros(1, dtype=torch.long))
        b = from_pipe.velocity(x, 0.5, from_pipe.encode(["a cat"]), torch.zeros(1, dtype=torch.long))
    torch.testing.assert_close(a, b)
    with pytest.raises(KeyError, match="no precomputed embedding"):
        pre.encode(["a dog"])
    pipe.save_pretrained(tmp_path / "sd3")
    loaded = SD3Model.from_pretrained(str(tmp_path / "sd3"), torch_dtype=torch.float32, height=32, width=32)
    with torch.no_grad():
        c = loaded.velocity(x, 0.5, loaded.encode(["a cat"]), torch.zeros(1, dtype=torch.long))
    torch.testing.assert_close(c, b)


def test_flux_packing_round_trip_and_guidance_embedding(tmp_path):
    model = FluxModel.from_pipeline(flux_pipeline(tmp_path), height=16, width=16)  # tiny VAE: no downsampling
    z = torch.randn(2, model.channels, model.h, model.w)
    assert torch.equal(model.unpack(model.pack(z)), z)
    assert model.latent_shape == (64, 16) and model.guidance_embeds
    assert torch.equal(model.time_grid(10).sigmas, sde.flux_time_grid(10, 64).sigmas)  # the shift of 64 tokens


def test_bad_setup_gives_clear_errors(tmp_path):
    pipe = sd3_pipeline(tmp_path)
    with pytest.raises(ValueError, match="pipeline .* or precomputed embeddings"):
        SD3Model(pipe.transformer, pipe.vae)
    with pytest.raises(ValueError, match="multiples of 2"):
        SD3Model.from_pipeline(pipe, height=31, width=32)
    with pytest.raises(FileNotFoundError, match="no diffusers pipeline folder"):
        SD3Model.from_pretrained(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="unknown attention"):
        set_attention(pipe.transformer, "fastest")
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ImportError, match="needs flash-attn"):
            SD3Model.from_pipeline(pipe, height=32, width=32, attention="flash")


@pytest.mark.parametrize("build", [sd3_pipeline, flux_pipeline], ids=["sd3", "flux"])
def test_sample_command_on_a_local_diffusers_folder(build, tmp_path, capsys):
    from tempflow import cli

    pipe = build(tmp_path)
    pipe.save_pretrained(tmp_path / "pipe")
    out = tmp_path / "grid.png"
    args = ["sample", "a cat", "a dog", "--per-prompt", "2", "--steps", "2", "--model", str(tmp_path / "pipe")]
    assert cli.main([*args, "--size", "16", "--out", str(out)]) == 0
    assert out.exists() and "4 samples" in capsys.readouterr().out


@pytest.mark.parametrize("build", [sd3_pipeline, flux_pipeline], ids=["sd3", "flux"])
def test_max_sequence_length_reaches_encode_prompt(build, tmp_path):
    """T5 prompts are 128 tokens by default, as Flow-GRPO and TempFlow-GRPO encode them (diffusers' default is 256
    for SD3 and 512 for FLUX)."""
    pipe = build(tmp_path)
    cls, size = (SD3Model, 32) if build is sd3_pipeline else (FluxModel, 16)
    seen = []
    encode_prompt = pipe.encode_prompt

    def spy(*args, **kwargs):
        seen.append(kwargs["max_sequence_length"])
        return encode_prompt(*args, **kwargs)

    pipe.encode_prompt = spy
    clip = 77 if cls is SD3Model else 0  # SD3 puts CLIP's 77 tokens before T5's
    for kwargs, tokens in (({}, 128), ({"max_sequence_length": 16}, 16)):
        model = cls.from_pipeline(pipe, height=size, width=size, **kwargs)
        cond = model.encode(["a cat"])
        assert seen[-2:] == [tokens, tokens]  # the prompts and the unconditional ""
        assert cond.cond["hidden"].shape[1] == clip + tokens and cond.null["hidden"].shape[1] == clip + tokens


@pytest.mark.parametrize("build", [sd3_pipeline, flux_pipeline], ids=["sd3", "flux"])
def test_initial_latents_are_the_pipelines_own(build, tmp_path):
    """A generator gives bit for bit the latents the diffusers pipeline's prepare_latents draws (shape, order and
    dtype; packed for FLUX), for one generator and for a list of them (one per image)."""
    pipe = build(tmp_path)
    cls, size = (SD3Model, 32) if build is sd3_pipeline else (FluxModel, 16)
    model = cls.from_pipeline(pipe, height=size, width=size, max_sequence_length=16)
    channels = pipe.transformer.config.in_channels // (1 if cls is SD3Model else 4)

    def official(gen, dtype):
        out = pipe.prepare_latents(3, channels, size, size, dtype, model.device, gen)
        return out[0] if isinstance(out, tuple) else out

    for dtype in (torch.float32, torch.bfloat16):
        ours = model.initial_latents(3, torch.Generator().manual_seed(5), dtype=dtype)
        assert ours.shape == (3, *model.latent_shape) and ours.dtype == dtype
        assert torch.equal(ours, official(torch.Generator().manual_seed(5), dtype))
        gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2, 3)]  # noqa: E731
        assert torch.equal(model.initial_latents(3, gens(), dtype=dtype), official(gens(), dtype))
    assert model.initial_latents(2, torch.Generator().manual_seed(5)).dtype == model.dtype  # the pipelines' dtype


def test_rollout_from_a_generator_and_rows_per_forward(tmp_path):
    """The rollout's main paths start from the pipeline's latents; SD3's CFG forwards pairs of rows, FLUX.1-dev's
    guidance embedding one row per sample, and no forward exceeds max_batch rows."""
    from tempflow.rollout import BranchPlan, RolloutConfig, rollout

    def reward(images, prompts, metadata):
        return images.float().mean(dim=(1, 2, 3))

    for build, cls, size, per in ((sd3_pipeline, SD3Model, 32, 2), (flux_pipeline, FluxModel, 16, 1)):
        pipe = build(tmp_path)
        model = cls.from_pipeline(pipe, height=size, width=size, max_sequence_length=16)
        rows = []
        model.forward_velocity = _counting(model.forward_velocity, rows)
        assert model.forward_rows(4.5) == per
        cfg = RolloutConfig(plan=BranchPlan.tempflow(3, 2), seeds_per_prompt=2, guidance=4.5, max_batch=5)
        stats = {}
        batch = rollout(model, ["a cat", "a dog"], reward, cfg, generator=torch.Generator().manual_seed(9),
                        stats=stats)  # fmt: skip
        channels = pipe.transformer.config.in_channels // (1 if cls is SD3Model else 4)
        start = pipe.prepare_latents(4, channels, size, size, model.dtype, model.device,
                                     torch.Generator().manual_seed(9))  # fmt: skip
        start = start[0] if isinstance(start, tuple) else start
        assert torch.equal(batch.state[(batch.step == 0) & (batch.branch == 0)], start.float())
        assert max(rows) == stats["largest_batch"] == (5 // per) * per


def _counting(forward, rows):
    def counted(x, t, cond, **kw):
        rows.append(x.shape[0])
        return forward(x, t, cond, **kw)

    return counted
