"""Model families and rewards by name: what the trainer's settings build from."""

import json
import sys
import textwrap

import pytest
import torch

from tempflow.rewards import DigitCorrectness, JpegCompressibility, WeightedSum
from tempflow.rewards.base import FunctionReward, RewardError, score
from tempflow.rewards.registry import build_reward, reward_parts


@pytest.fixture()
def user_module(tmp_path, monkeypatch):
    """A module of the user's own rewards on the Python path."""
    (tmp_path / "my_rewards.py").write_text(
        textwrap.dedent("""
        import torch

        def brightness(images, prompts, metadata, scale=1.0):
            return images.mean(dim=(1, 2, 3)) * scale

        class Tagged:
            name = "tagged"

            def __init__(self, bonus=0.0):
                self.bonus = bonus

            def __call__(self, images, prompts, metadata):
                return torch.tensor([len(m.get("tag", "")) + self.bonus for m in metadata])

        def broken(images, prompts, metadata):
            return torch.full((images.shape[0],), float("nan"))
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("my_rewards", None)


def test_rewards_by_name_mapping_and_import_path(user_module):
    images = torch.rand(3, 3, 8, 8)
    prompts, meta = ["a 1", "a 2", "a 3"], [{"tag": "ab"}, {"tag": "abc"}, {}]
    assert isinstance(build_reward("digit-correctness"), DigitCorrectness)
    jpeg = build_reward({"jpeg-compressibility": {"weight": 1.0, "quality": 50}})
    assert isinstance(jpeg, JpegCompressibility) and jpeg.quality == 50
    fn = build_reward({"my_rewards:brightness": {"weight": 1.0, "scale": 2.0}})
    torch.testing.assert_close(fn(images, prompts, meta), 2 * images.mean(dim=(1, 2, 3)))
    combo = build_reward({"my_rewards:brightness": 0.5, "my_rewards:Tagged": {"weight": 2.0, "bonus": 1.0}})
    assert isinstance(combo, WeightedSum)
    total, parts = score(combo, images, prompts, meta)
    torch.testing.assert_close(parts["my_rewards:Tagged"], torch.tensor([3.0, 4.0, 1.0]))  # metadata reaches it
    torch.testing.assert_close(total, 0.5 * images.mean(dim=(1, 2, 3)) + 2 * torch.tensor([3.0, 4.0, 1.0]))
    assert set(parts) == {"my_rewards:brightness", "my_rewards:Tagged"}
    # a plain function passed to score() is named by its function name, and checked like any reward
    _, named = score(lambda images, prompts, metadata: images.mean(dim=(1, 2, 3)), images, prompts, meta)
    assert list(named) == ["<lambda>"]


def test_digit_correctness_reports_its_agreement_beside_it():
    pytest.importorskip("sklearn")
    from tempflow import datasets

    x, y = datasets.digits("held-out")
    reward = DigitCorrectness()
    total, parts = reward.detailed(x[:40], [f"a handwritten {d}" for d in y[:40].tolist()])
    torch.testing.assert_close(total, reward(x[:40], [f"a handwritten {d}" for d in y[:40].tolist()]))
    agree = parts["digit-agreement"]
    assert set(agree.unique().tolist()) <= {0.0, 1.0} and agree.mean() > 0.9
    assert torch.equal(agree, (reward.model(x[:40]).argmax(1) == y[:40]).float())


def test_bad_reward_settings_are_named(user_module):
    with pytest.raises(ValueError, match="unknown reward 'pick-score': choose one of .*pickscore"):
        build_reward("pick-score")
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        build_reward({"nope": 1.0, "digit-correctness": 1.0})
    with pytest.raises(ValueError, match="reward 'jpeg-compressibility': .*unexpected keyword argument 'qualty'"):
        build_reward({"jpeg-compressibility": {"qualty": 90}})
    with pytest.raises(ValueError, match="cannot import 'no_such_module'"):
        build_reward("no_such_module:score")
    with pytest.raises(ValueError, match="module 'my_rewards' has no 'missing'"):
        build_reward("my_rewards:missing")
    with pytest.raises(ValueError, match="weight must be a number"):
        reward_parts({"digit-correctness": "heavy"})
    with pytest.raises(RewardError, match="'my_rewards:broken' returned 2 non-finite"):
        build_reward("my_rewards:broken")(torch.rand(2, 3, 8, 8), ["a", "b"])
    with pytest.raises(TypeError, match="not callable"):
        FunctionReward(3)


def test_the_digits_model_refuses_model_args():
    from tempflow.models import load_model

    with pytest.raises(TypeError, match=r"digits model takes no options \['num_frames'\]"):
        load_model("digits", num_frames=5)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from tempflow.models.tiny import save_tiny

    root = tmp_path_factory.mktemp("families")
    return {kind: save_tiny(kind, str(root / kind)) for kind in ("sd3", "flux")}


def test_families_are_detected_from_model_index(folders, tmp_path):
    from tempflow.models import FAMILIES, detect_family, load_model
    from tempflow.models.diffusers_models import FluxModel, SD3Model

    assert detect_family(folders["sd3"]).name == "sd3" and detect_family(folders["flux"]).name == "flux"
    sd3 = load_model(folders["sd3"], height=32, width=32, max_sequence_length=16)
    assert isinstance(sd3, SD3Model) and sd3.latent_shape == (4, 32, 32) and sd3.max_sequence_length == 16
    assert sd3.encode(["a cat"]).cond["hidden"].shape[1] == 77 + 16  # CLIP's 77 tokens, then max_sequence_length of T5
    flux = load_model(folders["flux"], height=16, width=16, dtype="bf16")
    assert isinstance(flux, FluxModel) and flux.dtype == torch.bfloat16 and flux.vae.dtype == torch.float32
    assert load_model(folders["sd3"]).height == 16  # the pipeline's own default size (sample_size x VAE scale)
    # another pipeline: say what the folder holds and what is supported
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline",
                                                        "unet": ["diffusers", "UNet2DConditionModel"]}))  # fmt: skip
    with pytest.raises(ValueError, match="pipeline StableDiffusionXLPipeline with transformer \\(none listed\\), "
                       "which no tempflow adapter handles \\(supported: SD3"):  # fmt: skip
        detect_family(str(other))
    (other / "model_index.json").write_text("{}")
    with pytest.raises(ValueError, match="\\(no _class_name\\)"):
        detect_family(str(other))
    (other / "model_index.json").write_text("{not json")
    with pytest.raises(ValueError, match="model_index.json is not valid JSON"):
        detect_family(str(other))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no model_index.json \\(found nothing\\)"):
        detect_family(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="'/no/such/model': not found"):
        load_model("/no/such/model")
    assert set(FAMILIES) >= {"sd3", "flux"}


def test_a_new_family_registers_without_touching_the_trainer(folders, tmp_path):
    from tempflow.models import FAMILIES, detect_family, register_family

    seen = {}

    def load(path, **options):
        seen.update(options)
        return "loaded"

    register_family("sd3-refined", "SD3 with a marker", lambda index: index.get("marker") == 1, load)
    try:
        marked = tmp_path / "marked"
        marked.mkdir()
        index = json.load(open(f"{folders['sd3']}/model_index.json"))
        (marked / "model_index.json").write_text(json.dumps({**index, "marker": 1}))
        assert detect_family(str(marked)).name == "sd3-refined"  # later registrations are tried first
        assert detect_family(folders["sd3"]).name == "sd3"
        from tempflow.models import load_model

        assert load_model(str(marked), height=64) == "loaded" and seen["height"] == 64
    finally:
        FAMILIES.pop("sd3-refined")
