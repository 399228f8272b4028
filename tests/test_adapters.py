"""One adapter test suite for every model: the tiny random-weight SD3, FLUX, Qwen-Image, Wan, Z-Image and FLUX.2
pipelines of tempflow.models.tiny (built offline), and the embedded digits model; then what each adapter must match
of its diffusers pipeline."""

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from tempflow import sde  # noqa: E402
from tempflow.models import digits as dg  # noqa: E402
from tempflow.models.diffusers_models import FluxModel, SD3Model, set_attention  # noqa: E402
from tempflow.models.flux2 import Flux2Model  # noqa: E402
from tempflow.models.qwenimage import QwenImageModel  # noqa: E402
from tempflow.models.tiny import flux2_pipeline, flux_pipeline, qwenimage_pipeline, sd3_pipeline, wan_pipeline  # noqa: E402
from tempflow.models.wan import WanModel  # noqa: E402
from tempflow.models.zimage import ZImageModel  # noqa: E402

# each diffusers family: its tiny pipeline, adapter, a test size, and the rows one guided sample forwards
FAMILIES = {"sd3": (sd3_pipeline, SD3Model, 32, 2), "flux": (flux_pipeline, FluxModel, 16, 1),
            "qwenimage": (qwenimage_pipeline, QwenImageModel, 16, 2),
            "flux2": (flux2_pipeline, Flux2Model, 16, 1)}  # fmt: skip


def ode_sample(model, start, prompts, steps, guidance):
    """The adapter's Euler ODE sampling on its own grid from the given latents, one sample per prompt: what a
    pipeline's ``__call__`` with an Euler scheduler computes."""
    grid, cond, index = model.time_grid(steps), model.encode(prompts), torch.arange(len(prompts))
    x = start
    with torch.no_grad():
        for k in range(steps):
            x = sde.ode_step(x, model.velocity(x, grid.sigmas[k], cond, index, guidance), k, grid)
    return x


def folder_round_trip(tmp_path, kind, pipeline, transformer, adapter, build, guidance=None, **options):
    """`tempflow tiny-model KIND` writes a folder whose model_index.json names ``pipeline`` and ``transformer``,
    which load_model recognises as family KIND and loads as the pipeline it was saved from: the velocity of an
    adapter on a freshly built tiny pipeline, bit for bit, and the VAE in fp32. Returns (folder, loaded, fresh, x)."""
    import json

    from tempflow import cli
    from tempflow.models import detect_family, load_model

    folder = tmp_path / kind
    assert cli.main(["tiny-model", kind, str(folder)]) == 0
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == pipeline and index["transformer"][1] == transformer
    assert detect_family(str(folder)).name == kind
    loaded = load_model(str(folder), height=16, width=16, dtype="fp32", **options)
    assert isinstance(loaded, adapter)
    fresh = adapter.from_pipeline(build(tmp_path / "work"), height=16, width=16, **options)
    x = fresh.initial_latents(2, torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = loaded.velocity(x, 0.4, loaded.encode(["a cat", "a dog"]), torch.tensor([0, 1]), guidance)
        b = fresh.velocity(x, 0.4, fresh.encode(["a cat", "a dog"]), torch.tensor([0, 1]), guidance)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert loaded.pipeline.vae.dtype == torch.float32
    return folder, loaded, fresh, x


def refuses_sibling_pipeline(folder, sibling):
    """The folder relabelled as ``sibling`` (another pipeline with the same transformer class) is refused by name."""
    import json

    from tempflow.models import load_model

    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = sibling
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"{sibling} with transformer {index['transformer'][1]}"):
        load_model(str(folder))


@pytest.fixture(params=["sd3", "flux", "qwenimage", "wan", "zimage", "flux2", "digits"])
def adapter(request, tmp_path):
    if request.param == "sd3":
        return SD3Model.from_pipeline(sd3_pipeline(tmp_path, t5=False), height=32, width=32)
    if request.param == "flux":  # 16 T5 tokens keep the tiny test fast (the default is 128, as both codebases)
        return FluxModel.from_pipeline(flux_pipeline(tmp_path), height=16, width=16, max_sequence_length=16)
    if request.param == "qwenimage":
        return QwenImageModel.from_pipeline(qwenimage_pipeline(tmp_path), height=16, width=16)
    if request.param == "wan":  # 5 frames: 2 latent frames; 16 text tokens keep it fast
        return WanModel.from_pipeline(wan_pipeline(tmp_path), height=16, width=16, num_frames=5,
                                      max_sequence_length=16)  # fmt: skip
    if request.param == "zimage":
        from tempflow.models.tiny import zimage_pipeline

        return ZImageModel.from_pipeline(zimage_pipeline(tmp_path), height=16, width=16)
    if request.param == "flux2":  # 64 tokens: the 26 of the chat template and the prompt (the default is 512)
        return Flux2Model.from_pipeline(flux2_pipeline(tmp_path), height=16, width=16, max_sequence_length=64)
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
    video = getattr(adapter, "num_frames", None)  # a video model decodes (B, F, C, H, W), an image model (B, C, H, W)
    if video:
        assert images.shape == (2, video, 3, adapter.height, adapter.width)
    else:
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


@pytest.mark.parametrize("family", ["sd3", "flux", "qwenimage", "flux2"])
def test_sample_command_on_a_local_diffusers_folder(family, tmp_path, capsys):
    from tempflow import cli

    pipe = FAMILIES[family][0](tmp_path)
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


@pytest.mark.parametrize("family", ["sd3", "flux", "qwenimage", "flux2"])
def test_initial_latents_are_the_pipelines_own(family, tmp_path):
    """A generator gives bit for bit the latents the diffusers pipeline's prepare_latents draws (shape, order and
    dtype; packed for FLUX and Qwen-Image), for one generator and for a list of them (one per image)."""
    build, cls, size, _ = FAMILIES[family]
    pipe = build(tmp_path)
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
    """The rollout's main paths start from the pipeline's latents; SD3's CFG and Qwen-Image's true CFG forward pairs
    of rows, FLUX.1-dev's and FLUX.2-dev's guidance embedding one row per sample, and no forward exceeds max_batch
    rows."""
    from tempflow.rollout import BranchPlan, RolloutConfig, rollout

    def reward(images, prompts, metadata):
        return images.float().mean(dim=(1, 2, 3))

    for build, cls, size, per in FAMILIES.values():
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


# --------------------------------------------------------------------------------------------------------------
# Qwen-Image: what the adapter must match of QwenImagePipeline
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def qwen(tmp_path):
    pipe = qwenimage_pipeline(tmp_path)
    return pipe, QwenImageModel.from_pipeline(pipe, height=16, width=16)


@pytest.mark.parametrize("steps", [2, 4, 10, 50])
@pytest.mark.parametrize("size", [16, 32, 64])
def test_qwenimage_grid_is_the_pipelines(steps, size, tmp_path):
    """The grid is what QwenImagePipeline.__call__ sets on its scheduler (the shipped Qwen-Image config: mu from
    calculate_shift of the packed token count, then the stretch to shift_terminal), bit for bit."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    pipe = qwenimage_pipeline(tmp_path)
    model = QwenImageModel.from_pipeline(pipe, height=size, width=size)
    tokens = model.latent_shape[0]
    assert tokens == (size // 4) ** 2  # the tiny VAE halves the size, then 2x2 patches
    cfg = pipe.scheduler.config
    mu = calculate_shift(tokens, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                         cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))  # fmt: skip
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(cfg)
    scheduler.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    grid = model.time_grid(steps)
    assert torch.equal(grid.sigmas, scheduler.sigmas) and torch.equal(grid.timesteps, scheduler.timesteps)
    assert grid.sigmas[-2].item() == pytest.approx(0.02, abs=1e-6)  # shift_terminal (in fp32)
    # real sizes: 512 px and 1024 px are 1024 and 4096 tokens with the real 8x VAE
    for real_tokens in (1024, 4096):
        scheduler.set_timesteps(
            steps,
            sigmas=np.linspace(1.0, 1 / steps, steps),
            mu=calculate_shift(
                real_tokens, cfg["base_image_seq_len"], cfg["max_image_seq_len"], cfg["base_shift"], cfg["max_shift"]
            ),
        )
        assert torch.equal(sde.qwenimage_time_grid(steps, real_tokens).sigmas, scheduler.sigmas)


def test_qwenimage_tiny_pipeline_has_the_published_scheduler_and_template(qwen):
    """The tiny pipeline's scheduler config is Qwen-Image's, and its tokenizer splits the chat template's text before
    the prompt into the 34 tokens the pipeline drops (as Qwen's own tokenizer does), leaving the prompt's tokens."""
    pipe, model = qwen
    cfg = pipe.scheduler.config
    published = {
        "base_image_seq_len": 256,
        "max_image_seq_len": 8192,
        "base_shift": 0.5,
        "max_shift": 0.9,
        "shift": 1.0,
        "shift_terminal": 0.02,
        "use_dynamic_shifting": True,
        "time_shift_type": "exponential",
    }
    assert {k: cfg[k] for k in published} == published
    assert model.schedule == sde.QWENIMAGE_SHIFT
    prefix = pipe.prompt_template_encode.split("{}")[0]
    assert len(pipe.tokenizer(prefix).input_ids) == pipe.prompt_template_encode_start_idx == 34
    hidden, mask = pipe.encode_prompt(["a cat", ""], device="cpu")
    # kept: the prompt's tokens, then <|im_end|> \n <|im_start|> assistant \n
    assert mask.sum(1).tolist() == [len(pipe.tokenizer("a cat").input_ids) + 5, 5]


def test_qwenimage_conditioning_pads_prompts_and_the_unconditional_one(qwen):
    """Prompts of different lengths and the unconditional "" share one padded length with a mask of their valid
    tokens; the hidden states are encode_prompt's, and a prompt's velocity does not depend on the padding."""
    pipe, model = qwen
    long = "a very long prompt about a red fox jumping over the lazy brown dog in the snow"
    cond = model.encode(["a cat", long])
    hidden, mask = pipe.encode_prompt(["a cat", long], device="cpu")
    null, null_mask = pipe.encode_prompt([""], device="cpu")
    assert cond.cond["hidden"].shape[1] == cond.null["hidden"].shape[1] == hidden.shape[1] > null.shape[1]
    torch.testing.assert_close(cond.cond["hidden"], hidden, rtol=0, atol=0)
    assert torch.equal(cond.cond["mask"], mask) and null_mask is None  # encode_prompt drops an all-ones mask
    n = null.shape[1]
    assert cond.null["mask"][0].tolist() == [1] * n + [0] * (hidden.shape[1] - n)
    assert torch.equal(cond.null["hidden"][0, :n], null[0]) and not cond.null["hidden"][0, n:].any()
    short = model.encode(["a cat"])  # shorter padding: the unconditional prompt's length
    assert short.cond["hidden"].shape[1] < cond.cond["hidden"].shape[1]
    x = model.initial_latents(1, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for g in (1.0, 4.0):
            a = model.velocity(x, 0.6, short, torch.tensor([0]), g)
            b = model.velocity(x, 0.6, cond, torch.tensor([0]), g)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    trimmed = QwenImageModel.from_pipeline(pipe, height=16, width=16, max_sequence_length=4).encode([long])
    assert trimmed.cond["hidden"].shape[1] == trimmed.null["hidden"].shape[1] == 4  # at most 4 tokens kept


@pytest.mark.parametrize("guidance", [1.0, 2.5, 4.0])
def test_qwenimage_velocity_is_the_pipelines_true_cfg(qwen, guidance):
    """velocity() with guidance is what QwenImagePipeline's loop computes from its two transformer calls (the
    prompts, then the negative prompt ""): ``comb = neg + g (cond - neg)`` rescaled to the conditional norm."""
    pipe, model = qwen
    prompts = ["a cat", "Two DOGS, 7!", "a cat"]
    x = model.initial_latents(3, torch.Generator().manual_seed(3))
    t = torch.tensor(0.7)
    with torch.no_grad():
        ours = model.velocity(x, t, model.encode(prompts), torch.arange(3), guidance)
        embeds, mask = pipe.encode_prompt(prompts, device="cpu")
        neg, neg_mask = pipe.encode_prompt([""] * 3, device="cpu")
        timestep = (t * 1000).expand(3).to(x.dtype)  # as the pipeline's loop: scheduler timesteps, then / 1000
        shapes = [[(1, model.h // 2, model.w // 2)]] * 3

        def call(e, m):
            return pipe.transformer(hidden_states=x, timestep=timestep / 1000, encoder_hidden_states=e,
                                    encoder_hidden_states_mask=m, img_shapes=shapes, return_dict=False)[0]  # fmt: skip

        noise_pred = call(embeds, mask)
        if guidance > 1:
            neg_pred = call(neg, neg_mask)
            comb = neg_pred + guidance * (noise_pred - neg_pred)
            noise_pred = comb * (torch.norm(noise_pred, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
    assert model.forward_rows(guidance) == (1 if guidance == 1 else 2)
    torch.testing.assert_close(ours, noise_pred, rtol=1e-5, atol=1e-5)
    assert guidance == 1 or not torch.allclose(ours, model.velocity(x, t, model.encode(prompts), torch.arange(3), 1.0))


def test_qwenimage_sampling_and_decoding_are_the_pipelines(qwen):
    """QwenImagePipeline.__call__ (true CFG with negative prompt "", its own grid) from the same initial latents
    gives the latents and images of the adapter's Euler ODE sampling on its time grid, then decode()."""
    pipe, model = qwen
    prompts, steps, g = ["a cat", "Two DOGS, 7!"], 4, 3.0
    start = model.initial_latents(2, torch.Generator().manual_seed(11))
    x = ode_sample(model, start, prompts, steps, g)
    with torch.no_grad():
        images = model.decode(x)
    kwargs = {"prompt": prompts, "negative_prompt": [""] * 2, "true_cfg_scale": g, "height": 16, "width": 16,
              "num_inference_steps": steps, "latents": start.clone()}  # fmt: skip
    latents = pipe(**kwargs, output_type="latent").images
    torch.testing.assert_close(x, latents, rtol=1e-4, atol=1e-5)
    official = pipe(**kwargs, output_type="pt").images
    assert images.shape == official.shape == (2, 3, 16, 16)
    torch.testing.assert_close(images, official, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.decode(latents), official, rtol=0, atol=0)  # decode alone: the same bits


def test_qwenimage_precomputed_embeddings_and_clear_errors(qwen, tmp_path):
    pipe, model = qwen
    embeddings = {}
    for p in ("a cat", "Two DOGS, 7!", ""):
        hidden, mask = pipe.encode_prompt([p], device="cpu")
        assert mask is None  # one prompt: no padding
        embeddings[p] = hidden[0]
    pre = QwenImageModel(pipe.transformer, pipe.vae, embeddings=embeddings, height=16, width=16)
    x = model.initial_latents(2, torch.Generator().manual_seed(1))
    index = torch.tensor([1, 0])
    with torch.no_grad():
        a = pre.velocity(x, 0.5, pre.encode(["a cat", "Two DOGS, 7!"]), index)
        b = model.velocity(x, 0.5, model.encode(["a cat", "Two DOGS, 7!"]), index)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert pre.time_grid(6).sigmas.equal(model.time_grid(6).sigmas)  # no pipeline: the published scheduler config
    with pytest.raises(KeyError, match="no precomputed embedding"):
        pre.encode(["a dog"])
    with pytest.raises(ValueError, match=r"one tensor hidden \(L_p, D\)"):
        QwenImageModel(pipe.transformer, pipe.vae, embeddings={"": embeddings[""][None]}).encode([""])
    with pytest.raises(ValueError, match=r"embeddings=\{prompt: hidden \(L_p, D\)"):
        QwenImageModel(pipe.transformer, pipe.vae)
    with pytest.raises(ValueError, match="multiples of 4"):
        QwenImageModel.from_pipeline(pipe, height=18, width=16)
    with pytest.raises(ValueError, match="flash-attn 2.*takes no attention mask"):
        QwenImageModel.from_pipeline(pipe, height=16, width=16, attention="flash")
    import importlib.util

    if importlib.util.find_spec("xformers") is None:
        with pytest.raises(ImportError, match="needs xformers"):
            QwenImageModel.from_pipeline(pipe, height=16, width=16, attention="xformers")
    edit = diffusers.QwenImageTransformer2DModel(num_layers=1, attention_head_dim=16, num_attention_heads=2,
                                                 in_channels=16, out_channels=4, joint_attention_dim=16,
                                                 axes_dims_rope=(8, 4, 4), zero_cond_t=True)  # fmt: skip
    with pytest.raises(ValueError, match="zero_cond_t: a guidance-distilled, editing or layered variant"):
        QwenImageModel(edit, pipe.vae, pipeline=pipe)
    pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config,
                                                                           use_karras_sigmas=True)  # fmt: skip
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        QwenImageModel.from_pipeline(pipe, height=16, width=16)


def test_qwenimage_folder_round_trip(tmp_path):
    """`tempflow tiny-model qwenimage` writes a folder that load_model recognises as Qwen-Image and loads as the
    pipeline it was saved from; an editing pipeline's folder (same transformer class) is refused by name."""
    folder, loaded, _, x = folder_round_trip(tmp_path, "qwenimage", "QwenImagePipeline", "QwenImageTransformer2DModel",
                                             QwenImageModel, qwenimage_pipeline)  # fmt: skip
    assert loaded.max_sequence_length == 128
    with torch.no_grad():
        assert loaded.decode(x).shape == (2, 3, 16, 16)
    refuses_sibling_pipeline(folder, "QwenImageEditPipeline")


# --------------------------------------------------------------------------------------------------------------
# Wan 2.1 text-to-video: what the adapter must match of WanPipeline
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def wan(tmp_path):
    pipe = wan_pipeline(tmp_path)
    return pipe, WanModel.from_pipeline(pipe, height=16, width=16, num_frames=5, max_sequence_length=16)


@pytest.mark.parametrize("steps", [1, 2, 10, 50])
@pytest.mark.parametrize("flow_shift", [None, 3.0, 1.0])
def test_wan_grid_is_the_shipped_schedulers(steps, flow_shift, wan):
    """The grid's times are the sigmas of the scheduler Wan ships (UniPCMultistepScheduler with flow sigmas, its
    config's flow_shift 5.0, or the flow_shift given, as the pipeline's docs set it with from_config), bit for bit;
    its timesteps are 1000 t, which the scheduler truncates to integers."""
    pipe, _ = wan
    model = WanModel.from_pipeline(pipe, height=16, width=16, num_frames=5, flow_shift=flow_shift)
    scheduler = diffusers.UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=flow_shift or 5.0)
    scheduler.set_timesteps(steps)
    grid = model.time_grid(steps)
    assert pipe.scheduler.config.flow_shift == 5.0 and model.shift == (flow_shift or 5.0)
    assert torch.equal(grid.sigmas, scheduler.sigmas)
    assert (grid.timesteps - scheduler.timesteps).abs().max() < 1 and torch.equal(
        grid.timesteps, grid.sigmas[:-1] * 1000
    )
    # a FlowMatchEulerDiscreteScheduler in the pipeline: its static-shift grid
    pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    euler = WanModel.from_pipeline(pipe, height=16, width=16, num_frames=5)
    pipe.scheduler.set_timesteps(steps)
    assert torch.equal(euler.time_grid(steps).sigmas, pipe.scheduler.sigmas)


def test_wan_grid_without_a_pipeline_follows_the_size():
    """Without a scheduler: flow_shift 3.0 below 720p, 5.0 from 720p (1280 x 720), as the pipeline's docs say."""
    from tempflow.models.wan import _schedule

    assert _schedule(None, None, 480, 832)["shift"] == 3.0 and _schedule(None, None, 720, 1280)["shift"] == 5.0
    assert _schedule(None, 7.0, 480, 832)["shift"] == 7.0
    assert sde.wan_time_grid(3, 3.0).sigmas[0].item() == pytest.approx(1 - 1e-6)


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_wan_cfg_velocity_is_the_pipelines_two_forwards(guidance, wan):
    """One batched forward of the negative and conditional halves gives what WanPipeline computes with two forwards
    (``noise_uncond + g (noise_pred - noise_uncond)``), prompts and the negative prompt from its encode_prompt."""
    pipe, _ = wan
    model = WanModel.from_pipeline(pipe, height=16, width=16, num_frames=5, max_sequence_length=16,
                                   negative_prompt="blurry, static")  # fmt: skip
    prompts = ["a cat", "Two DOGS, 7!", "a cat"]
    x = model.initial_latents(3, torch.Generator().manual_seed(3))
    t = torch.tensor([0.9, 0.5, 0.2])
    with torch.no_grad():
        ours = model.velocity(x, t, model.encode(prompts[:2]), torch.tensor([0, 1, 0]), guidance)
        embeds, neg = pipe.encode_prompt(prompts, negative_prompt=["blurry, static"] * 3, device="cpu",
                                         do_classifier_free_guidance=True, max_sequence_length=16)  # fmt: skip
        assert embeds.shape == neg.shape == (3, 16, 16)  # zero-padded to max_sequence_length

        def call(e):
            return pipe.transformer(hidden_states=x, timestep=t * 1000, encoder_hidden_states=e, return_dict=False)[0]

        noise_pred = call(embeds)
        if guidance > 1:
            noise_uncond = call(neg)
            noise_pred = noise_uncond + guidance * (noise_pred - noise_uncond)
    assert model.forward_rows(guidance) == (1 if guidance == 1 else 2)
    torch.testing.assert_close(ours, noise_pred, rtol=1e-5, atol=1e-5)
    if guidance > 1:  # the negative prompt is the unconditional half
        plain = WanModel.from_pipeline(pipe, height=16, width=16, num_frames=5, max_sequence_length=16)
        with torch.no_grad():
            other = plain.velocity(x, t, plain.encode(prompts[:2]), torch.tensor([0, 1, 0]), guidance)
        assert not torch.allclose(ours, other)


def test_wan_sampling_and_decoding_are_the_pipelines(wan):
    """WanPipeline.__call__ with a FlowMatchEulerDiscreteScheduler (an Euler ODE like tempflow's; Wan's UniPC is a
    multistep solver) from the same latents gives the adapter's latents and videos; initial_latents are the pipeline's
    prepare_latents draws, for one generator and a list."""
    pipe, _ = wan
    pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    model = WanModel.from_pipeline(pipe, height=16, width=16, num_frames=5, max_sequence_length=16)
    prompts, steps, g = ["a cat", "Two DOGS, 7!"], 3, 4.0
    official_start = pipe.prepare_latents(2, 4, 16, 16, 5, torch.float32, "cpu", torch.Generator().manual_seed(11))
    start = model.initial_latents(2, torch.Generator().manual_seed(11))
    assert start.dtype == torch.float32 and torch.equal(start, official_start)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2)]  # noqa: E731
    assert torch.equal(model.initial_latents(2, gens()), pipe.prepare_latents(2, 4, 16, 16, 5, torch.float32, "cpu",
                                                                               gens()))  # fmt: skip
    x = ode_sample(model, start, prompts, steps, g)
    with torch.no_grad():
        videos = model.decode(x)
    kwargs = {
        "prompt": prompts,
        "negative_prompt": "",
        "guidance_scale": g,
        "height": 16,
        "width": 16,
        "num_frames": 5,
        "num_inference_steps": steps,
        "latents": start.clone(),
        "max_sequence_length": 16,
    }
    latents = pipe(**kwargs, output_type="latent").frames
    torch.testing.assert_close(x, latents, rtol=1e-4, atol=1e-5)
    official = pipe(**kwargs, output_type="pt").frames
    assert videos.shape == official.shape == (2, 5, 3, 16, 16)
    torch.testing.assert_close(videos, official, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.decode(latents), official, rtol=0, atol=0)  # decode alone: the same bits


def test_wan_rollout_branches_videos_from_the_pipelines_latents(wan):
    """The tree rollout on 5-D video latents: it starts from prepare_latents' draws, forwards CFG pairs within
    max_batch rows, and scores videos (B, F, C, H, W) with a video reward."""
    from tempflow.rewards import TemporalConsistency
    from tempflow.rollout import BranchPlan, RolloutConfig, rollout

    pipe, model = wan
    rows, seen = [], []
    model.forward_velocity = _counting(model.forward_velocity, rows)
    consistency = TemporalConsistency()

    def reward(videos, prompts, metadata):
        seen.append(tuple(videos.shape))
        return consistency(videos, prompts, metadata)

    cfg = RolloutConfig(plan=BranchPlan.tempflow(3, 2), seeds_per_prompt=2, guidance=5.0, max_batch=5)
    stats = {}
    batch = rollout(model, ["a cat", "a dog"], reward, cfg, generator=torch.Generator().manual_seed(9), stats=stats)
    start = pipe.prepare_latents(4, 4, 16, 16, 5, torch.float32, "cpu", torch.Generator().manual_seed(9))
    assert torch.equal(batch.state[(batch.step == 0) & (batch.branch == 0)], start)
    assert max(rows) == stats["largest_batch"] == 4  # two CFG pairs in 5 rows
    assert seen and all(s[1:] == (5, 3, 16, 16) for s in seen) and batch.images.shape[1:] == (5, 3, 16, 16)
    assert torch.isfinite(batch.reward).all() and ((batch.reward >= 0) & (batch.reward <= 1)).all()


def test_wan_precomputed_embeddings_lora_targets_and_clear_errors(wan, tmp_path):
    pipe, model = wan
    embeddings = {p: pipe.encode_prompt([p], do_classifier_free_guidance=False, max_sequence_length=16)[0][0]
                  for p in ("a cat", "")}  # fmt: skip
    pre = WanModel(pipe.transformer, pipe.vae, embeddings=embeddings, height=16, width=16, num_frames=5,
                   max_sequence_length=16)  # fmt: skip
    x = model.initial_latents(1, torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = pre.velocity(x, 0.5, pre.encode(["a cat"]), torch.zeros(1, dtype=torch.long))
        b = model.velocity(x, 0.5, model.encode(["a cat"]), torch.zeros(1, dtype=torch.long))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert pre.shift == 3.0  # no scheduler, under 720p
    with pytest.raises(KeyError, match="the negative prompt 'ugly'"):
        WanModel(pipe.transformer, pipe.vae, embeddings=embeddings, height=16, width=16, num_frames=5,
                 max_sequence_length=16, negative_prompt="ugly").encode(["a cat"])  # fmt: skip
    with pytest.raises(ValueError, match="padded to max_sequence_length=512"):
        WanModel(pipe.transformer, pipe.vae, embeddings=embeddings, height=16, width=16, num_frames=5).encode([""])
    with pytest.raises(ValueError, match=r"num_frames must be k \* 4 \+ 1 .* e.g. 5 or 9"):
        WanModel.from_pipeline(pipe, height=16, width=16, num_frames=7)
    with pytest.raises(ValueError, match=r"flow_shift must be > 0 \(Wan: 3.0 at 480p"):
        WanModel.from_pipeline(pipe, height=16, width=16, num_frames=5, flow_shift=0)
    with pytest.raises(ValueError, match="multiples of 8"):
        WanModel.from_pipeline(pipe, height=20, width=16, num_frames=5)
    with pytest.raises(TypeError, match="drives a WanTransformer3DModel, got QwenImage"):
        WanModel(qwenimage_pipeline(tmp_path / "qwen").transformer, pipe.vae, pipeline=pipe)
    i2v = diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                          in_channels=8, out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32,
                                          num_layers=1, image_dim=8, added_kv_proj_dim=24)  # fmt: skip
    with pytest.raises(ValueError, match="image-to-video model"):
        WanModel(i2v, pipe.vae, pipeline=pipe)
    import importlib.util

    for attention, package in (("xformers", "xformers"), ("flash", "flash_attn")):
        if importlib.util.find_spec(package) is None:
            with pytest.raises(ImportError, match=f"attention='{attention}' needs {package}"):
                WanModel.from_pipeline(pipe, height=16, width=16, num_frames=5, attention=attention)
    pipe.register_to_config(expand_timesteps=True)
    with pytest.raises(ValueError, match=r"expand_timesteps \(Wan 2.2 TI2V"):
        WanModel.from_pipeline(pipe, height=16, width=16, num_frames=5)
    pipe.register_to_config(expand_timesteps=False)
    pipe.register_to_config(boundary_ratio=0.875)
    with pytest.raises(ValueError, match="Wan 2.2 two-expert pipeline"):
        WanModel.from_pipeline(pipe, height=16, width=16, num_frames=5)
    pipe.register_to_config(boundary_ratio=None)
    pipe.scheduler = diffusers.UniPCMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        WanModel.from_pipeline(pipe, height=16, width=16, num_frames=5)
    pytest.importorskip("peft")
    model.use_lora(rank=2, alpha=4)
    names = {n.split(".lora")[0].split(".", 2)[-1] for n, p in model.transformer.named_parameters() if p.requires_grad}
    assert names == {f"{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")}


def test_wan_folder_round_trip(tmp_path):
    """`tempflow tiny-model wan` writes a folder load_model recognises as Wan and loads as the pipeline it was saved
    from (the scheduler config included); Wan's image-to-video pipeline (same transformer class) is refused."""
    from tempflow.models import load_model
    from tempflow.train.config import TrainConfig

    folder, loaded, _, x = folder_round_trip(tmp_path, "wan", "WanPipeline", "WanTransformer3DModel", WanModel,
                                             wan_pipeline, num_frames=5, max_sequence_length=16)  # fmt: skip
    assert type(loaded.pipeline.scheduler).__name__ == "UniPCMultistepScheduler"
    assert loaded.shift == 5.0 and loaded.latent_shape == (4, 2, 4, 4)
    # the settings' default max_sequence_length (0: the model's own) gives Wan its 512 UMT5 tokens, SD3 and co 128
    options = {**TrainConfig(device="cpu", height=16, width=16).model_options(), "num_frames": 5}
    assert load_model(str(folder), **options).max_sequence_length == 512
    with torch.no_grad():
        assert loaded.decode(x).shape == (2, 5, 3, 16, 16)
    refuses_sibling_pipeline(folder, "WanImageToVideoPipeline")


def test_wan_sample_command_writes_a_gif_per_video(tmp_path, capsys):
    """`tempflow sample` on a Wan folder: the PNG grid of filmstrips and one animated GIF per sample, with the frames
    decode() gives (num_frames from model_args)."""
    from PIL import Image

    from tempflow import cli
    from tempflow.models.tiny import save_tiny

    folder = save_tiny("wan", str(tmp_path / "wan"))
    out = tmp_path / "clips.png"
    args = ["sample", "a cat", "a dog", "--per-prompt", "2", "--steps", "2", "--model", folder, "--size", "16",
            "--set", "model_args={num_frames: 9, negative_prompt: blurry}", "--set", "max_sequence_length=16",
            "--out", str(out), "--scale", "1", "--fps", "10"]  # fmt: skip
    assert cli.main(args) == 0
    said = capsys.readouterr().out
    assert "4 samples" in said and "4 videos (9 frames, 10 fps)" in said
    assert Image.open(out).size == (2 + 2 * (8 * 16 + 2), 2 + 2 * (16 + 2))  # 8 of the 9 frames side by side
    for i in range(4):
        gif = Image.open(tmp_path / f"clips-{i:03d}.gif")
        assert gif.n_frames == 9 and gif.size == (16, 16) and gif.info["duration"] == 100 and gif.info["loop"] == 0
    assert cli.main([*args[:-6], "--set", "model_args={num_frames: 8}", "--out", str(out)]) == 2
    assert "num_frames must be k * 4 + 1" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------
# Z-Image: what the adapter must match of ZImagePipeline
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def zimage(tmp_path):
    from tempflow.models.tiny import zimage_pipeline

    pipe = zimage_pipeline(tmp_path)
    return pipe, ZImageModel.from_pipeline(pipe, height=32, width=32)


@pytest.mark.parametrize("steps", [1, 2, 4, 10, 50])
@pytest.mark.parametrize("dynamic", [False, True])
def test_zimage_grid_is_the_pipelines(steps, dynamic, zimage):
    """The grid is what ZImagePipeline.__call__ sets on its scheduler: sigmas linspace(1, 1/T, T), Z-Image's static
    shift 3 (or, with use_dynamic_shifting, mu of the image's tokens), then 0."""
    from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift, get_default_z_image_sigmas

    pipe, model = zimage
    if dynamic:
        pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config,
                                                                               use_dynamic_shifting=True)  # fmt: skip
        model = ZImageModel.from_pipeline(pipe, height=32, width=32)
    mu = calculate_shift((model.h // 2) * (model.w // 2))
    pipe.scheduler.set_timesteps(sigmas=get_default_z_image_sigmas(steps), mu=mu)
    grid = model.time_grid(steps)
    assert torch.equal(grid.sigmas, pipe.scheduler.sigmas)
    assert torch.equal(grid.timesteps, pipe.scheduler.timesteps)
    if not dynamic:  # without a pipeline: the published config (static shift 3)
        pre = ZImageModel(pipe.transformer, pipe.vae, embeddings={"": torch.zeros(1, 16)}, height=32, width=32)
        assert torch.equal(pre.time_grid(steps).sigmas, grid.sigmas)


def test_zimage_tiny_pipeline_template_and_prompt_rows(zimage):
    """Qwen3's chat template with thinking on; encode_prompt gives one tensor of valid tokens per prompt, which the
    Conditioning holds zero-padded (with a mask) to the longer of the prompts' and the unconditional one's."""
    pipe, model = zimage
    text = pipe.tokenizer.apply_chat_template([{"role": "user", "content": "a cat"}], tokenize=False,
                                              add_generation_prompt=True, enable_thinking=True)  # fmt: skip
    assert text == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n"
    long = "a very long prompt about a red fox jumping over the lazy brown dog in the snow"
    rows = pipe.encode_prompt(["a cat", long], device="cpu", do_classifier_free_guidance=False)[0]
    null = pipe.encode_prompt([""], device="cpu", do_classifier_free_guidance=False)[0][0]
    cond = model.encode(["a cat", long])
    n0, n1 = rows[0].shape[0], rows[1].shape[0]
    assert cond.cond["hidden"].shape[1] == cond.null["hidden"].shape[1] == n1 > n0 > null.shape[0]
    assert cond.cond["mask"].sum(1).tolist() == [n0, n1] and cond.null["mask"].sum().item() == null.shape[0]
    assert torch.equal(cond.cond["hidden"][0, :n0], rows[0]) and not cond.cond["hidden"][0, n0:].any()
    assert torch.equal(cond.cond["hidden"][1], rows[1]) and torch.equal(cond.null["hidden"][0, : null.shape[0]], null)
    trimmed = ZImageModel.from_pipeline(pipe, height=32, width=32, max_sequence_length=6).encode([long])
    assert trimmed.cond["hidden"].shape[1] == 6  # at most 6 tokens of the templated prompt kept
    assert model.max_sequence_length == 512  # the pipeline's default


def test_zimage_velocity_does_not_depend_on_the_padding(zimage):
    pipe, model = zimage
    long = "a very long prompt about a red fox jumping over the lazy brown dog in the snow"
    short, padded = model.encode(["a cat"]), model.encode(["a cat", long])
    assert short.cond["hidden"].shape[1] < padded.cond["hidden"].shape[1]
    x = model.initial_latents(1, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for g in (1.0, 4.0):
            a = model.velocity(x, 0.6, short, torch.tensor([0]), g)
            b = model.velocity(x, 0.6, padded, torch.tensor([0]), g)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("guidance,normalization", [(1.0, 0.0), (3.0, 0.0), (5.0, 0.8)])
def test_zimage_velocity_is_the_pipelines(zimage, guidance, normalization):
    """velocity() is minus the transformer's output at time 1 - t, and with guidance g the pipeline's
    ``pos + (g - 1)(pos - neg)`` (its guidance_scale is g - 1), renormalised as its cfg_normalization does."""
    pipe, model = zimage
    model.cfg_normalization = normalization
    prompts = ["a cat", "Two DOGS, 7!", "a cat"]
    x = model.initial_latents(3, torch.Generator().manual_seed(3))
    t = torch.tensor(0.7)
    with torch.no_grad():
        ours = model.velocity(x, t, model.encode(prompts), torch.arange(3), guidance)
        pos, neg = pipe.encode_prompt(list(prompts), device="cpu")
        timestep = (1000 - (t * 1000).expand(3)) / 1000

        def call(embeds):
            out = pipe.transformer(list(x.unsqueeze(2).unbind(0)), timestep, embeds, return_dict=False)[0]
            return torch.stack([o.float() for o in out]).squeeze(2)

        expected = call(pos)
        if guidance != 1:
            neg_out, s = call(neg), guidance - 1
            rows = []
            for p_, n_ in zip(expected, neg_out, strict=True):
                pred = p_ + s * (p_ - n_)
                if normalization > 0 and pred.norm() > p_.norm() * normalization:
                    pred = pred * (p_.norm() * normalization / pred.norm())
                rows.append(pred)
            expected = torch.stack(rows)
    assert model.forward_rows(guidance) == (1 if guidance == 1 else 2)
    torch.testing.assert_close(ours, -expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("guidance,normalization,truncation", [(1.0, 0.0, 1.0), (3.0, 0.0, 1.0), (4.0, 0.5, 1.0),
                                                                (3.0, 0.0, 0.3), (3.0, 0.8, 0.0)])  # fmt: skip
def test_zimage_sampling_and_decoding_are_the_pipelines(zimage, guidance, normalization, truncation):
    """ZImagePipeline.__call__ (guidance_scale g - 1, negative prompt "", its own grid) from the same initial
    latents gives the latents and images of the adapter's Euler ODE sampling on its time grid, then decode()."""
    pipe, model = zimage
    model.cfg_normalization, model.cfg_truncation = normalization, truncation
    prompts, steps = ["a cat", "Two DOGS, 7!"], 3
    start = model.initial_latents(2, torch.Generator().manual_seed(11))
    assert torch.equal(start, pipe.prepare_latents(2, 4, 32, 32, torch.float32, "cpu",
                                                   torch.Generator().manual_seed(11)))  # fmt: skip
    x = ode_sample(model, start, prompts, steps, guidance)
    with torch.no_grad():
        images = model.decode(x)
    kwargs = {"height": 32, "width": 32, "num_inference_steps": steps, "guidance_scale": guidance - 1,
              "cfg_normalization": normalization, "cfg_truncation": truncation, "latents": start.clone()}  # fmt: skip
    latents = pipe(list(prompts), **kwargs, output_type="latent").images  # the pipeline rewrites its prompt list
    torch.testing.assert_close(x, latents, rtol=1e-5, atol=1e-6)
    official = pipe(list(prompts), **kwargs, output_type="pt").images
    assert images.shape == official.shape == (2, 3, 32, 32)
    torch.testing.assert_close(images, official, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.decode(latents), official, rtol=0, atol=0)


def test_zimage_precomputed_embeddings_lora_and_clear_errors(zimage):
    pipe, model = zimage
    embeddings = {p: pipe.encode_prompt([p], device="cpu", do_classifier_free_guidance=False)[0][0]
                  for p in ("a cat", "Two DOGS, 7!", "")}  # fmt: skip
    pre = ZImageModel(pipe.transformer, pipe.vae, embeddings=embeddings, height=32, width=32)
    x = model.initial_latents(2, torch.Generator().manual_seed(1))
    index = torch.tensor([1, 0])
    with torch.no_grad():
        a = pre.velocity(x, 0.5, pre.encode(["a cat", "Two DOGS, 7!"]), index, 3.0)
        b = model.velocity(x, 0.5, model.encode(["a cat", "Two DOGS, 7!"]), index, 3.0)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"one tensor hidden \(L_p, D\)"):
        ZImageModel(pipe.transformer, pipe.vae, embeddings={"": embeddings[""][None]}).encode([""])
    with pytest.raises(ValueError, match="multiples of 4"):
        ZImageModel.from_pipeline(pipe, height=18, width=16)
    with pytest.raises(ValueError, match="flash-attn 2.*takes no attention mask"):
        ZImageModel.from_pipeline(pipe, height=16, width=16, attention="flash")
    bad = diffusers.FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        ZImageModel(pipe.transformer, pipe.vae, pipeline=type("P", (), {"scheduler": bad})())
    omni = diffusers.ZImageTransformer2DModel(in_channels=4, dim=32, n_layers=1, n_refiner_layers=1, n_heads=2,
                                              n_kv_heads=2, cap_feat_dim=16, axes_dims=[4, 6, 6],
                                              axes_lens=[256, 32, 32], siglip_feat_dim=8)  # fmt: skip
    with pytest.raises(ValueError, match="Omni variant"):
        ZImageModel(omni, pipe.vae, pipeline=pipe)
    model.use_lora(rank=2, alpha=4)
    names = [n for n, p in model.transformer.named_parameters() if p.requires_grad]
    assert names and all("lora" in n for n in names)
    assert {n.split(".lora")[0].split(".")[-1] for n in names} == {"to_q", "to_k", "to_v", "0"}
    with torch.no_grad():
        c = model.velocity(x, 0.5, model.encode(["a cat", "Two DOGS, 7!"]), index, 3.0)
        with model.reference():
            d = model.velocity(x, 0.5, model.encode(["a cat", "Two DOGS, 7!"]), index, 3.0)
    torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-5)  # adapters start at zero
    torch.testing.assert_close(d, b, rtol=1e-5, atol=1e-5)


def test_zimage_folder_round_trip(tmp_path):
    """`tempflow tiny-model zimage` writes a folder that load_model recognises as Z-Image and loads as the pipeline
    it was saved from; an image-to-image pipeline's folder (same transformer class, prompts take an image) is refused
    by name."""
    from tempflow.models.tiny import zimage_pipeline

    folder, loaded, _, x = folder_round_trip(tmp_path, "zimage", "ZImagePipeline", "ZImageTransformer2DModel",
                                             ZImageModel, zimage_pipeline, guidance=3.0)  # fmt: skip
    assert loaded.max_sequence_length == 512
    with torch.no_grad():
        assert loaded.decode(x).shape == (2, 3, 16, 16)
    refuses_sibling_pipeline(folder, "ZImageImg2ImgPipeline")


def test_zimage_rollout_starts_from_the_pipelines_latents_in_pairs_of_rows(zimage):
    """The rollout starts from the latents ZImagePipeline.prepare_latents draws (fp32, whatever the weights'); with
    guidance a sample forwards a pair of rows, without it one, and no forward exceeds max_batch rows."""
    from tempflow.rollout import BranchPlan, RolloutConfig, rollout

    pipe, model = zimage

    def reward(images, prompts, metadata):
        return images.float().mean(dim=(1, 2, 3))

    for guidance, per in ((3.0, 2), (1.0, 1)):
        rows = []
        model.forward_velocity = _counting(ZImageModel.forward_velocity.__get__(model), rows)
        cfg = RolloutConfig(plan=BranchPlan.tempflow(3, 2), seeds_per_prompt=2, guidance=guidance, max_batch=5)
        stats = {}
        batch = rollout(model, ["a cat", "a dog"], reward, cfg, generator=torch.Generator().manual_seed(9),
                        stats=stats)  # fmt: skip
        start = pipe.prepare_latents(4, 4, 32, 32, torch.float32, "cpu", torch.Generator().manual_seed(9))
        assert torch.equal(batch.state[(batch.step == 0) & (batch.branch == 0)], start)
        assert max(rows) == stats["largest_batch"] == (5 // per) * per
    model.transformer.to(torch.bfloat16)
    x = model.initial_latents(2, torch.Generator().manual_seed(0))
    assert x.dtype == torch.float32  # the pipeline draws in fp32
    with torch.no_grad():
        for g in (1.0, 3.0):
            assert model.velocity(x, 0.5, model.encode(["a cat"]), torch.tensor([0, 0]), g).dtype == torch.float32


def test_zimage_cfg_truncation_is_per_sample(zimage):
    """With cfg_truncation, a batch of samples at different times guides those before the cut and not those after
    it, each as alone; guidance off altogether past the cut."""
    pipe, model = zimage
    model.cfg_truncation = 0.3
    cond = model.encode(["a cat", "a dog"])
    x = model.initial_latents(3, torch.Generator().manual_seed(4))
    t, index = torch.tensor([0.9, 0.5, 0.8]), torch.tensor([0, 1, 1])  # normalised times 0.1, 0.5, 0.2
    with torch.no_grad():
        both = model.velocity(x, t, cond, index, 3.0)
        alone = torch.cat([model.velocity(x[i : i + 1], t[i], cond, index[i : i + 1], 3.0) for i in range(3)])
        plain = model.velocity(x, t, cond, index, 1.0)
    torch.testing.assert_close(both, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both[1], plain[1], rtol=1e-5, atol=1e-5)  # past the cut: unguided
    assert not torch.allclose(both[0], plain[0])


# FLUX.2-dev: what the adapter must match of Flux2Pipeline
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def flux2(tmp_path):
    pipe = flux2_pipeline(tmp_path)
    return pipe, Flux2Model.from_pipeline(pipe, height=16, width=16, max_sequence_length=64)


@pytest.mark.parametrize("steps", [1, 4, 10, 28])
@pytest.mark.parametrize("tokens", [16, 1024, 4096, 6000])
def test_flux2_grid_is_the_pipelines(steps, tokens):
    """sde.flux2_time_grid is what Flux2Pipeline gives its scheduler (linspace sigmas, compute_empirical_mu of the
    token count and the step count), bit for bit."""
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu, retrieve_timesteps

    from tempflow.models.tiny import FLUX2_SCHEDULER

    assert sde.flux2_mu(tokens, steps) == compute_empirical_mu(tokens, steps)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER)
    sigmas = np.linspace(1.0, 1 / steps, steps)
    timesteps, _ = retrieve_timesteps(scheduler, steps, "cpu", sigmas=sigmas, mu=compute_empirical_mu(tokens, steps))
    grid = sde.flux2_time_grid(steps, tokens)
    assert torch.equal(grid.sigmas, scheduler.sigmas)
    assert torch.equal(grid.timesteps, timesteps)


def test_flux2_sampling_and_decoding_are_the_pipelines(flux2):
    """From the pipeline's own noise (same generator), the adapter's ODE steps on its grid with the guidance
    embedding give the pipeline's latents and images (output_type latent and pt) exactly."""
    pipe, model = flux2
    assert model.latent_shape == (16, 16) and model.forward_rows() == 1 and model.forward_rows(7.0) == 1
    prompts, steps, g = ["a red cat", "dog"], 3, 3.0
    kwargs = dict(prompt=prompts, height=16, width=16, num_inference_steps=steps, guidance_scale=g,
                  max_sequence_length=64)  # fmt: skip
    ref = pipe(**kwargs, generator=torch.Generator().manual_seed(1), output_type="latent").images
    images = pipe(**kwargs, generator=torch.Generator().manual_seed(1), output_type="pt").images
    assert torch.equal(model.time_grid(steps).sigmas, pipe.scheduler.sigmas)
    x = ode_sample(model, model.initial_latents(2, generator=torch.Generator().manual_seed(1)), prompts, steps, g)
    torch.testing.assert_close(x, ref, rtol=0, atol=0)
    torch.testing.assert_close(model.decode(x), images, rtol=0, atol=1e-6)


def test_flux2_velocity_is_one_forward_with_the_guidance_embedding(flux2):
    """Per-sample times and prompt rows gathered by index equal the transformer called as the pipeline calls it;
    the guidance scale changes the velocity (it is embedded), and a batch is one forward."""
    pipe, model = flux2
    hidden, text_ids = pipe.encode_prompt(["a cat", "a dog"], device="cpu", max_sequence_length=64)
    cond = model.encode(["a cat", "a dog"])
    torch.testing.assert_close(cond.cond["hidden"], hidden, rtol=0, atol=0)
    x = model.initial_latents(3, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.9, 0.5, 0.2])
    index = torch.tensor([1, 0, 1])
    ids = pipe._prepare_latent_ids(torch.zeros(1, 16, 4, 4))
    calls = []
    forward = model.transformer.forward
    model.transformer.forward = lambda *a, **kw: (calls.append(kw["hidden_states"].shape[0]), forward(*a, **kw))[1]
    with torch.no_grad():
        v = model.velocity(x, t, cond, index, 2.5)
        v2 = model.velocity(x, t, cond, index, 5.0)
    model.transformer.forward = forward
    assert calls == [3, 3]
    with torch.no_grad():
        ref = pipe.transformer(hidden_states=x, timestep=(t * 1000) / 1000, guidance=torch.full((3,), 2.5),
                               encoder_hidden_states=hidden[index], txt_ids=text_ids[index], img_ids=ids,
                               return_dict=False)[0]  # fmt: skip
    torch.testing.assert_close(v, ref, rtol=0, atol=0)
    assert not torch.allclose(v, v2)


def test_flux2_lora_targets_precomputed_embeddings_and_clear_errors(flux2, tmp_path):
    pipe, model = flux2
    model.use_lora(rank=2, alpha=4)
    names = [n for n, _ in model.transformer.named_parameters() if "lora_A" in n]
    assert any("single_transformer_blocks" in n and "to_qkv_mlp_proj" in n for n in names)
    assert any("transformer_blocks.0.attn.add_q_proj" in n for n in names)
    hidden, _ = pipe.encode_prompt(["a cat", ""], device="cpu", max_sequence_length=64)
    pre = Flux2Model(pipe.transformer, pipe.vae, embeddings={"a cat": hidden[0], "": hidden[1]}, height=16, width=16)
    torch.testing.assert_close(pre.encode(["a cat"]).cond["hidden"], hidden[:1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="one length"):
        Flux2Model(pipe.transformer, pipe.vae, embeddings={"a": hidden[0], "": hidden[1, :10]}).encode(["a"])
    with pytest.raises(ValueError, match="one tensor"):
        Flux2Model(pipe.transformer, pipe.vae, embeddings={"a": hidden, "": hidden[1]}).encode(["a"])
    klein = diffusers.Flux2Transformer2DModel(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                              num_attention_heads=2, joint_attention_dim=24,
                                              axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)  # fmt: skip
    with pytest.raises(ValueError, match="guidance_embeds=False"):
        Flux2Model(klein, pipe.vae, pipeline=pipe)
    config = pipe.scheduler.config
    pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config, shift_terminal=0.05)
    stretched = Flux2Model.from_pipeline(pipe, height=16, width=16)
    assert torch.equal(stretched.time_grid(4).sigmas, sde.flux2_time_grid(4, 16, shift_terminal=0.05).sigmas)
    pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config, use_dynamic_shifting=False)
    with pytest.raises(ValueError, match="use_dynamic_shifting=False"):
        Flux2Model.from_pipeline(pipe, height=16, width=16)


def test_flux2_folder_round_trip(tmp_path):
    """`tempflow tiny-model flux2` writes a folder that load_model recognises as FLUX.2 and loads as the pipeline it
    was saved from; a klein pipeline's folder (same transformer class) is refused by name."""
    from tempflow.models import load_model

    folder, loaded, fresh, x = folder_round_trip(tmp_path, "flux2", "Flux2Pipeline", "Flux2Transformer2DModel",
                                                 Flux2Model, flux2_pipeline, max_sequence_length=64)  # fmt: skip
    assert load_model(str(folder), height=16, width=16).max_sequence_length == 512
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(x), fresh.decode(x), rtol=0, atol=0)
    refuses_sibling_pipeline(folder, "Flux2KleinPipeline")
