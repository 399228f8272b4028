import json
import os

import pytest
import torch

from tempflow import datasets
from tempflow.rewards import (
    Aesthetic,
    DigitCorrectness,
    HPSv2,
    JpegCompressibility,
    PickScore,
    Reward,
    RewardError,
    WeightedSum,
    prompt_digit,
)
from tempflow.rewards import digits as digit_reward


def test_prompt_digit():
    assert prompt_digit("a handwritten 7") == 7
    assert prompt_digit("The digit SEVEN, neatly") == 7
    assert prompt_digit("zero") == 0
    with pytest.raises(ValueError, match="names no digit"):
        prompt_digit("a handwritten letter")


def test_shipped_classifier_accuracy():
    pytest.importorskip("sklearn")
    model = digit_reward.load_classifier()
    x, y = datasets.digits("held-out")
    acc = digit_reward.accuracy(model, x, y)
    meta = json.load(open(os.path.splitext(digit_reward.CLASSIFIER_WEIGHTS)[0] + ".json"))
    assert acc >= 0.95 and acc == pytest.approx(meta["held_out_accuracy"], abs=1e-3)


def test_classifier_training_is_reproducible():
    pytest.importorskip("sklearn")
    a, acc_a = digit_reward.train_classifier(seed=3, epochs=1, log=lambda *_: None)
    b, acc_b = digit_reward.train_classifier(seed=3, epochs=1, log=lambda *_: None)
    assert acc_a == acc_b
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_digit_correctness_rewards_the_prompted_digit():
    pytest.importorskip("sklearn")
    x, y = datasets.digits("held-out")
    reward = DigitCorrectness()
    right = reward(x[:32], [f"a handwritten {d}" for d in y[:32].tolist()])
    wrong = reward(x[:32], [f"a handwritten {(d + 1) % 10}" for d in y[:32].tolist()])
    assert right.shape == (32,) and right.mean() > 0.9 and wrong.mean() < 0.1
    rgb = reward(x[:4].expand(-1, 3, -1, -1), ["x"] * 4, [{"digit": d} for d in y[:4].tolist()])
    torch.testing.assert_close(rgb, right[:4])  # RGB input and metadata digits work the same
    big = torch.nn.functional.interpolate(x[:4], size=(64, 64), mode="nearest")
    assert reward(big, [f"{d}" for d in y[:4].tolist()]).mean() > 0.8  # any resolution


def test_jpeg_compressibility_prefers_simple_images():
    flat = torch.full((2, 3, 64, 64), 0.5)
    noisy = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    r = JpegCompressibility()
    assert (r(flat, ["a", "b"]) > r(noisy, ["a", "b"])).all()
    with pytest.raises(ValueError, match="quality"):
        JpegCompressibility(quality=0)


class _Constant(Reward):
    name = "constant"

    def __init__(self, value, shape=None):
        super().__init__()
        self.value, self.shape = value, shape

    def score(self, images, prompts, metadata):
        return torch.full(self.shape or (images.shape[0],), self.value)


def test_weighted_sum_and_bad_rewards_are_named():
    images = torch.rand(3, 1, 8, 8)
    combo = WeightedSum({_Constant(1.0): 2.0, JpegCompressibility(): 0.0})
    torch.testing.assert_close(combo(images, ["a"] * 3), torch.full((3,), 2.0))
    assert set(combo.components(images, ["a"] * 3)) == {"constant", "jpeg-compressibility"}
    with pytest.raises(RewardError, match="'constant' returned 3 non-finite"):
        _Constant(float("nan"))(images, ["a"] * 3)
    with pytest.raises(RewardError, match=r"'constant' returned shape \(2,\)"):
        WeightedSum([(_Constant(1.0, shape=(2,)), 1.0)])(images, ["a"] * 3)
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        _Constant(1.0)(images, ["a", "b"])
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        _Constant(1.0)(torch.rand(3, 8, 8), ["a"] * 3)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random-weight CLIPModel and processor saved to a local folder, as a user's downloaded copy would be."""
    pytest.importorskip("transformers")
    from tempflow.models.tiny import save_tiny

    return save_tiny("clip", str(tmp_path_factory.mktemp("clip") / "clip"))


def test_pickscore_from_a_local_folder(tiny_clip):
    reward = PickScore(str(tiny_clip))
    images = torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(1))
    scores = reward(images, ["a cat", "a dog", "two cats"])
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    # it is CLIP's cosine: the same image and prompt score the same wherever they sit in the batch
    again = reward(images.flip(0), ["two cats", "a dog", "a cat"]).flip(0)
    torch.testing.assert_close(scores, again, rtol=1e-4, atol=1e-4)


def test_aesthetic_from_local_files(tiny_clip, tmp_path):
    from safetensors.torch import save_file

    from tempflow.rewards.clip import AestheticHead

    head = AestheticHead(16)
    save_file(head.state_dict(), str(tmp_path / "head.safetensors"))
    torch.save(head.state_dict(), str(tmp_path / "head.pth"))
    images = torch.rand(2, 3, 32, 32)
    a = Aesthetic(str(tiny_clip), str(tmp_path / "head.safetensors"))(images, ["", ""])
    b = Aesthetic(str(tiny_clip), str(tmp_path / "head.pth"))(images, ["", ""])
    assert a.shape == (2,)
    torch.testing.assert_close(a, b)


def test_missing_weights_give_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="PickScore model not found.*downloads nothing"):
        PickScore(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="HPS v2 checkpoint not found"):
        HPSv2(str(tmp_path / "HPS_v2_compressed.pt"))
    with pytest.raises(FileNotFoundError, match="digit classifier weights not found"):
        DigitCorrectness(weights=str(tmp_path / "none.safetensors"))
