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
    if request.param == "flux":
        pipe = flux_pipeline(tmp_path)
        pipe.tokenizer_2.model_max_length = 16
        model = FluxModel.from_pipeline(pipe, height=16, width=16)
        model._encode_texts = _short_flux_encode(model)
        return model
    torch.manual_seed(0)
    return dg.DigitsModel(dg.DigitsConfig(num_layers=1, attention_head_dim=8, num_attention_heads=2, text_dim=16))


def _short_flux_encode(model):
    """FLUX pads T5 prompts to 512 tokens; 16 keep the tiny test fast (the code path is the same)."""

    def encode(prompts):
        hidden, pooled, _ = model.pipeline.encode_prompt(prompts, prompts, device=model.device, max_sequence_length=16)
        return hidden, pooled

    return encode


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
