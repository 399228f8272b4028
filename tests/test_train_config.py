"""TrainConfig: every setting converted and checked when made (YAML, --set, Python), before any model loads."""

import pytest

from tempflow.train.config import SettingError, TrainConfig


def test_yaml_values_are_converted_by_the_setting_type(tmp_path):
    path = tmp_path / "run.yaml"
    # PyYAML reads 1e-4 as a string and yes as a bool: both must land as the setting's type
    path.write_text("lr: 1e-4\nweighting: off\nsteps: '8'\nreward: {digit-correctness: 1.0, jpeg-compressibility: "
                    "{weight: 0.1, quality: 90}}\ntrain_steps: [0, 2, 4]\neval_guidance: null\n")  # fmt: skip
    cfg = TrainConfig.from_sources(str(path), ["clip_eps=2e-4", "weighting=yes", "train_steps=[1, 3]"])
    assert cfg.lr == 1e-4 and isinstance(cfg.lr, float) and cfg.clip_eps == 2e-4
    assert cfg.weighting is True and cfg.steps == 8 and cfg.train_steps == [1, 3] and cfg.eval_guidance is None
    assert cfg.reward == {"digit-correctness": 1.0, "jpeg-compressibility": {"weight": 0.1, "quality": 90}}
    assert cfg.trained_steps() == (1, 3) and cfg.plan().sde_steps == (1, 3)
    cfg = TrainConfig.from_sources(None, ["reward={pickscore: {weight: 2, path: /m}}", "eval_prompts="])
    assert cfg.reward == {"pickscore": {"weight": 2, "path": "/m"}} and cfg.eval_prompts == ""


@pytest.mark.parametrize(
    "sets, match",
    [
        (["lr=abc"], r"setting lr='abc': expected a number"),
        (["weighting=maybe"], r"setting weighting='maybe': expected true/false"),
        (["steps=1.5"], r"setting steps='1.5': expected an integer"),
        (["lr=-1"], r"setting lr=-1.0: must be > 0"),
        (["checkpoint_every=0"], r"setting checkpoint_every=0: must be >= 1"),
        (["ema=1"], r"setting ema=1.0: must be in \[0, 1\)"),
        (["method=ddpo"], r"setting method='ddpo': choose one of tempflow, flow-grpo"),
        (["dtype=fp8"], r"setting dtype='fp8': choose one of fp32, bf16, fp16"),
        (["out="], r"setting out='': give an output folder"),
        (["lr_rate=3"], r"unknown setting 'lr_rate'"),
        (["reward=nope"], r"setting reward: unknown reward 'nope': choose one of .*digit-correctness"),
        (["reward={pickscore: yes}"], r"weight must be a number"),
        (["train_steps=[0, 10]"], r"train_steps=\[0, 10\]: steps must be distinct and in 0 .. 9"),
        (["train_steps=[2, 2]"], r"distinct"),
        (["steps=1"], r"no step to train"),
        (["schedule=cps", "train_steps=[8, 9]"], r"cps has no noise at the last step"),
        (["lr"], r"--set 'lr': write name=value"),
    ],
)
def test_bad_settings_name_the_setting_and_what_is_allowed(sets, match):
    with pytest.raises(SettingError, match=match):
        TrainConfig.from_sources(None, sets)


@pytest.mark.parametrize(
    "kw, why",
    [
        (dict(branches=1), "branches=1 and group=seed"),
        (dict(method="flow-grpo", seeds_per_prompt=1), "flow-grpo with seeds_per_prompt=1"),
        (dict(branches=1, seeds_per_prompt=1, group="prompt"), "group=prompt needs"),
        (dict(branches=1, seeds_per_prompt=1, prompts_per_iteration=1, group="global"), "group=global needs"),
    ],
)
def test_settings_that_cannot_learn_are_refused(kw, why):
    with pytest.raises(SettingError, match=f"no learning signal: .*{why}"):
        TrainConfig(**kw)
    TrainConfig(**{**kw, "branches": 2, "seeds_per_prompt": 2})  # one more branch or seed gives a signal


def test_derived_settings():
    cfg = TrainConfig(steps=10, timestep_fraction=0.5)
    assert cfg.trained_steps() == (0, 1, 2, 3, 4)
    assert TrainConfig(steps=10).trained_steps() == tuple(range(9))  # the last step is never trained by default
    assert TrainConfig(steps=10, timestep_fraction=0.99).trained_steps() == tuple(range(9))  # Flow-GRPO's setting
    rc = TrainConfig(method="flow-grpo", seeds_per_prompt=3, guidance=4.5, noise_level=0.9, max_batch=7, seed=5)
    r = rc.rollout_config()
    assert (r.seeds_per_prompt, r.guidance, r.noise_level, r.max_batch, r.seed) == (3, 4.5, 0.9, 7, 5)
    assert r.plan.mode == "trajectory" and r.plan.sde_steps == tuple(range(9))
    opts = TrainConfig(resolution=512, height=768, dtype="bf16", device="cpu").model_options()
    assert opts == dict(device="cpu", dtype="bf16", height=768, width=512, attention="sdpa", max_sequence_length=None)
    assert TrainConfig(max_sequence_length=77).model_options()["max_sequence_length"] == 77


def test_model_args_reach_the_loader_and_cannot_shadow_settings():
    """A family's own options (Wan's num_frames, negative_prompt) go to load_model beside the common ones."""
    cfg = TrainConfig.from_sources(None, ["model_args={num_frames: 33, negative_prompt: 'blurry, static'}",
                                          "device=cpu"])  # fmt: skip
    assert cfg.model_args == {"num_frames": 33, "negative_prompt": "blurry, static"}
    assert cfg.model_options()["num_frames"] == 33 and cfg.model_options()["negative_prompt"] == "blurry, static"
    assert TrainConfig.from_sources(None, ["model_args="]).model_args == {}
    with pytest.raises(SettingError, match="dtype, height are settings of their own"):
        TrainConfig.from_sources(None, ["model_args={height: 64, dtype: bf16}"])
    with pytest.raises(SettingError, match="expected a mapping of option names"):
        TrainConfig.from_sources(None, ["model_args=frames"])
    text = TrainConfig.help()
    for name in ("model", "prompts", "reward", "eval_every", "train_steps", "adv_clip", "weight_decay", "dtype"):
        assert f"  {name} = " in text
