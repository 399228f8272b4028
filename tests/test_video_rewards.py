"""Rewards for videos (B, F, C, H, W): an image reward's mean over chosen frames, temporal consistency, both from
settings; image rewards refuse videos with a message that says what to use."""

import pytest
import torch

from tempflow.rewards import FrameReward, JpegCompressibility, TemporalConsistency, WeightedSum, build_reward, score
from tempflow.rewards.base import FunctionReward


def brightness(images, prompts, metadata):
    """An image reward whose value is easy to predict: the mean pixel, plus 1 for prompts marked in metadata."""
    assert images.dim() == 4 and len(prompts) == len(metadata) == images.shape[0]
    return images.mean(dim=(1, 2, 3)) + torch.tensor([float(m.get("bonus", 0)) for m in metadata])


def video_of(levels, channels=3, size=4):
    """Videos whose frame f is the constant levels[b][f]."""
    v = torch.tensor(levels, dtype=torch.float32)
    return v[:, :, None, None, None].expand(-1, -1, channels, size, size).clone()


def test_frame_reward_averages_the_chosen_frames():
    videos = video_of([[0.0, 0.2, 0.4, 0.6], [1.0, 0.5, 0.5, 0.0]])
    meta = [{"bonus": 1}, {}]
    image_reward = FunctionReward(brightness, "brightness")
    cases = {"all": [1.3, 0.5], "first": [1.0, 1.0], "last": [1.6, 0.0], (1, -1): [1.4, 0.25], (2, 2): [1.4, 0.5]}
    for frames, expected in cases.items():
        got = FrameReward(image_reward, frames=frames if isinstance(frames, str) else list(frames))(
            videos, ["a", "b"], meta
        )
        torch.testing.assert_close(got, torch.tensor(expected))
    # a plain function and a built-in image reward work too; a single frame scores as that image
    torch.testing.assert_close(FrameReward(brightness, "first")(videos, ["a", "b"]), torch.tensor([0.0, 1.0]))
    jpeg = JpegCompressibility()
    frames = torch.rand(2, 3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(FrameReward(jpeg, [1])(frames, ["a", "b"]), jpeg(frames[:, 1], ["a", "b"]))


def test_temporal_consistency_is_one_minus_the_mean_frame_difference():
    videos = video_of([[0.5, 0.5, 0.5], [0.0, 1.0, 0.0], [0.0, 0.25, 0.5]], channels=1)
    torch.testing.assert_close(TemporalConsistency()(videos, ["a"] * 3), torch.tensor([1.0, 0.0, 0.75]))
    noise = torch.rand(4, 5, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    values = TemporalConsistency()(noise, ["a"] * 4)
    assert ((values >= 0) & (values <= 1)).all() and (values < 0.9).all()
    assert TemporalConsistency()(noise[:, :1], ["a"] * 4).eq(1).all()  # one frame: nothing changes


def test_video_rewards_from_settings_and_in_a_weighted_sum():
    reward = build_reward({"frames": {"weight": 1.0, "reward": "jpeg-compressibility", "frames": "last"},
                           "temporal-consistency": 0.5})  # fmt: skip
    assert isinstance(reward, WeightedSum)
    videos = torch.rand(2, 3, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    total, parts = score(reward, videos, ["a", "b"])
    assert set(parts) == {"frames", "temporal-consistency"}
    jpeg = JpegCompressibility()(videos[:, -1], ["a", "b"])
    torch.testing.assert_close(parts["frames"], jpeg)
    torch.testing.assert_close(total, jpeg + 0.5 * TemporalConsistency()(videos, ["a", "b"]))
    nested = build_reward({"frames": {"reward": {"jpeg-compressibility": {"quality": 50}}, "name": "jpeg-frames"}})
    assert nested.name == "jpeg-frames" and nested.image_reward.quality == 50


def test_images_and_videos_are_refused_where_they_do_not_fit():
    videos = torch.rand(2, 3, 3, 8, 8)
    with pytest.raises(ValueError, match=r"jpeg-compressibility: scores images .* got videos \(2, 3, 3, 8, 8\).*"
                                         r"FrameReward"):  # fmt: skip
        JpegCompressibility()(videos, ["a", "b"])
    with pytest.raises(ValueError, match="temporal-consistency: scores videos .* got images"):
        TemporalConsistency()(videos[:, 0], ["a", "b"])
    with pytest.raises(ValueError, match=r"frame indices \[3\] are outside a video of 3 frames"):
        FrameReward(brightness, [0, 3])(videos, ["a", "b"])
    with pytest.raises(ValueError, match="frames must be 'all', 'first', 'last'"):
        FrameReward(brightness, "middle")
    with pytest.raises(ValueError, match="non-empty list of integer frame indices"):
        FrameReward(brightness, [])
    with pytest.raises(ValueError, match="3 prompts for 2 images"):
        TemporalConsistency()(videos, ["a", "b", "c"])


def test_videos_in_grids_and_gifs(tmp_path):
    """Grids draw videos as filmstrips of up to 8 evenly spaced frames; a GIF holds every frame."""
    from PIL import Image

    from tempflow.train.plots import filmstrip, save_gif, save_grid

    videos = video_of([[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]] * 2, size=2)
    strip = filmstrip(videos)
    assert strip.shape == (2, 3, 2, 16)
    torch.testing.assert_close(strip[0, 0, 0, ::2], torch.tensor([0.0, 0.1, 0.3, 0.4, 0.6, 0.7, 0.9, 1.0]))
    assert torch.equal(filmstrip(videos[:, :3]), torch.cat([videos[:, 0], videos[:, 1], videos[:, 2]], dim=-1))
    assert torch.equal(filmstrip(videos[:, :1]), videos[:, 0])
    save_grid(videos, 2, str(tmp_path / "grid.png"), scale=1, pad=1)
    assert Image.open(tmp_path / "grid.png").size == (1 + 2 * 17, 1 + 3)
    save_gif(videos[0], str(tmp_path / "v.gif"), fps=20, scale=2)
    gif = Image.open(tmp_path / "v.gif")
    assert gif.n_frames == 11 and gif.size == (4, 4) and gif.info["duration"] == 50
    gif.seek(10)
    assert gif.convert("RGB").getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(ValueError, match=r"a video must be \(F, C, H, W\)"):
        save_gif(videos, str(tmp_path / "bad.gif"))
