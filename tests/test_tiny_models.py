"""The tiny random-weight models of tempflow.models.tiny: folders that reload as the pipelines they were saved from,
the same weights for the same seed, and the command that writes them."""

import json
import os
import subprocess
import sys

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from tempflow import cli  # noqa: E402
from tempflow.models import load_model, tiny  # noqa: E402
from tempflow.models.diffusers_models import FluxModel, SD3Model  # noqa: E402
from tempflow.models.qwenimage import QwenImageModel  # noqa: E402
from tempflow.models.wan import WanModel  # noqa: E402
from tempflow.models.zimage import ZImageModel  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a cat", "Two DOGS, 7!", ""]  # upper case, punctuation and the empty prompt go through the tokenizers too


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One folder of each kind, seed 0, written by save_tiny."""
    root = tmp_path_factory.mktemp("tiny")
    for kind in tiny.KINDS:
        tiny.save_tiny(kind, str(root / kind))
    return {kind: root / kind for kind in tiny.KINDS}


def reload(folder):
    index = json.loads((folder / "model_index.json").read_text())
    absent = {k: None for k, v in index.items() if v == [None, None]}
    return diffusers.DiffusionPipeline.from_pretrained(str(folder), local_files_only=True, **absent)


def encode(pipe):
    with torch.no_grad():
        if isinstance(pipe, diffusers.WanPipeline):  # UMT5 hidden states zero-padded to 16 tokens
            return pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=16, do_classifier_free_guidance=False)[
                :1
            ]
        if isinstance(pipe, diffusers.QwenImagePipeline):  # hidden states of the valid tokens, and their mask
            return pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=16)
        if isinstance(pipe, diffusers.ZImagePipeline):  # one tensor of valid tokens per prompt
            return pipe.encode_prompt(list(PROMPTS), device="cpu", max_sequence_length=16,
                                      do_classifier_free_guidance=False)[0]  # fmt: skip
        if isinstance(pipe, diffusers.FluxPipeline):
            return pipe.encode_prompt(PROMPTS, PROMPTS, device="cpu", max_sequence_length=16)
        hidden, _, pooled, _ = pipe.encode_prompt(PROMPTS, PROMPTS, PROMPTS, device="cpu", max_sequence_length=16,
                                                  do_classifier_free_guidance=False)  # fmt: skip
        return hidden, pooled


def modules(pipe):
    return {name: c for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}


@pytest.mark.parametrize("kind", ["sd3", "sd3-no-t5", "flux", "qwenimage", "wan", "zimage"])
def test_saved_pipeline_reloads_as_the_one_in_memory(kind, saved, tmp_path):
    if kind == "wan":
        pipe, folder = tiny.wan_pipeline(tmp_path / "work"), saved["wan"]
    elif kind == "zimage":
        pipe, folder = tiny.zimage_pipeline(tmp_path / "work"), saved["zimage"]
    elif kind == "flux":
        pipe, folder = tiny.flux_pipeline(tmp_path / "work"), saved["flux"]
    elif kind == "qwenimage":
        pipe, folder = tiny.qwenimage_pipeline(tmp_path / "work"), saved["qwenimage"]
    elif kind == "sd3":
        pipe, folder = tiny.sd3_pipeline(tmp_path / "work"), saved["sd3"]
    else:
        pipe, folder = tiny.sd3_pipeline(tmp_path / "work", t5=False), tmp_path / "saved"
        pipe.save_pretrained(folder)
    assert not any(m.training for m in modules(pipe).values())  # as from_pretrained gives them: no dropout
    loaded = reload(folder)
    assert type(loaded) is type(pipe)
    assert modules(loaded).keys() == modules(pipe).keys()
    if kind.startswith("sd3"):
        assert (loaded.text_encoder_3 is None) == (loaded.tokenizer_3 is None) == (kind == "sd3-no-t5")
    elif kind == "flux":
        assert loaded.transformer.config.guidance_embeds
    elif kind == "wan":  # Wan's scheduler (UniPC, flow sigmas, flow_shift 5) and VAE factors survive the round trip
        assert type(loaded.scheduler).__name__ == "UniPCMultistepScheduler"
        assert {k: loaded.scheduler.config[k] for k in tiny.WAN_SCHEDULER} == tiny.WAN_SCHEDULER
        assert (loaded.vae_scale_factor_temporal, loaded.vae_scale_factor_spatial) == (4, 4)
    elif kind == "zimage":  # Z-Image: the scheduler config and the chat template survive the round trip
        assert {k: loaded.scheduler.config[k] for k in tiny.ZIMAGE_SCHEDULER} == tiny.ZIMAGE_SCHEDULER
        assert loaded.tokenizer.chat_template == tiny.QWEN3_CHAT_TEMPLATE
    else:  # Qwen-Image: the scheduler config and the tokenizer's special tokens survive the round trip
        assert {k: loaded.scheduler.config[k] for k in tiny.QWEN_SCHEDULER} == tiny.QWEN_SCHEDULER
        assert loaded.tokenizer.tokenize("<|im_start|>user\n") == ["<|im_start|>", "user", "\u010a"]
    for name, module in modules(pipe).items():
        for (ka, va), (kb, vb) in zip(module.state_dict().items(), modules(loaded)[name].state_dict().items(),
                                      strict=True):  # fmt: skip
            assert ka == kb and torch.equal(va, vb), f"{name}.{ka}"
    for a, b in zip(encode(pipe), encode(loaded), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    if kind.startswith("sd3"):  # SD3's hidden states: 77 CLIP tokens, then 16 T5 tokens (zeros without a T5)
        hidden = encode(loaded)[0]
        assert hidden.shape == (3, 77 + 16, 32)
        assert bool(hidden[:, 77:].abs().sum() > 0) == (kind == "sd3")


@pytest.mark.parametrize("kind", ["sd3", "flux", "qwenimage", "wan", "zimage"])
def test_load_model_takes_a_saved_folder(kind, saved):
    size = {"sd3": 32, "flux": 16, "qwenimage": 16, "wan": 16, "zimage": 16}[kind]
    video = {"num_frames": 5} if kind == "wan" else {}
    model = load_model(str(saved[kind]), height=size, width=size, torch_dtype=torch.float32, **video)
    classes = {"sd3": SD3Model, "flux": FluxModel, "qwenimage": QwenImageModel, "wan": WanModel, "zimage": ZImageModel}
    assert isinstance(model, classes[kind])
    cond = model.encode(["a cat", "a dog"])
    x = torch.randn(2, *model.latent_shape)
    with torch.no_grad():
        v = model.velocity(x, 0.5, cond, torch.tensor([0, 1]))
        images = model.decode(x)
    assert v.shape == x.shape and torch.isfinite(v).all()
    assert images.shape == ((2, 5, 3, size, size) if video else (2, 3, size, size))


def test_clip_folder_loads_in_the_rewards(saved, tmp_path):
    from tempflow.rewards import Aesthetic, PickScore
    from tempflow.rewards.clip import AestheticHead

    images = torch.rand(2, 3, 40, 48, generator=torch.Generator().manual_seed(1))
    scores = PickScore(str(saved["clip"]))(images, ["a cat", "a dog"])
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    torch.save(AestheticHead(16).state_dict(), str(tmp_path / "head.pth"))
    assert torch.isfinite(Aesthetic(str(saved["clip"]), str(tmp_path / "head.pth"))(images, ["", ""])).all()


def files(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


@pytest.mark.parametrize("kind", tiny.KINDS)
def test_the_seed_makes_the_weights(kind, saved, tmp_path):
    rng = torch.get_rng_state()
    same = tiny.save_tiny(kind, str(tmp_path / "same"))
    other = tiny.save_tiny(kind, str(tmp_path / "other"), seed=1)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's random stream is left alone
    assert files(saved[kind]) == files(same) == files(other)
    weights = [f for f in files(same) if f.endswith(".safetensors")]
    assert weights
    for f in files(same):
        a, b, c = (os.path.join(folder, f) for folder in (saved[kind], same, other))
        if f in weights:
            wa, wb, wc = load_file(a), load_file(b), load_file(c)
            assert all(torch.equal(wa[k], wb[k]) for k in wa), f
            assert not all(torch.equal(wa[k], wc[k]) for k in wa), f
        else:  # configs and tokenizers do not depend on the seed, nor on where they were written
            assert open(a, "rb").read() == open(b, "rb").read() == open(c, "rb").read(), f


def test_save_tiny_refuses_what_it_should(tmp_path):
    with pytest.raises(
        ValueError, match="unknown tiny model kind 'sdxl': choose one of sd3, flux, qwenimage, wan, .*clip"
    ):
        tiny.save_tiny("sdxl", str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not an empty folder"):
        tiny.save_tiny("clip", str(tmp_path / "full"))
    assert os.listdir(tmp_path / "full") == ["keep.txt"]
    (tmp_path / "file").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not an empty folder"):
        tiny.save_tiny("clip", str(tmp_path / "file"))
    assert cli.main(["tiny-model", "clip", str(tmp_path / "full")]) == 2  # the command says so, exit status 2
    with pytest.raises(ValueError, match="invalid literal"):  # a failure midway leaves nothing behind
        tiny.save_tiny("clip", str(tmp_path / "broken"), seed="zero")
    assert not (tmp_path / "broken").exists()
    (tmp_path / "empty").mkdir()
    assert tiny.save_tiny("clip", tmp_path / "empty") == str(tmp_path / "empty")  # an empty folder is fine
    assert (tmp_path / "empty" / "model.safetensors").exists()


def test_tiny_model_command(tmp_path):
    folder = tmp_path / "clip"
    cmd = [sys.executable, "-m", "tempflow.cli", "tiny-model", "clip", str(folder), "--seed", "3"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"wrote a tiny random-weight clip model to {folder}" in done.stdout
    expected = load_file(tiny.save_tiny("clip", str(tmp_path / "here"), seed=3) + "/model.safetensors")
    written = load_file(str(folder / "model.safetensors"))
    assert expected.keys() == written.keys() and all(torch.equal(expected[k], written[k]) for k in expected)
