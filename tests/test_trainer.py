import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from tempflow import cli  # noqa: E402
from tempflow.models import digits as dg  # noqa: E402
from tempflow.rewards import DigitCorrectness  # noqa: E402
from tempflow.train.trainer import TrainConfig, train  # noqa: E402

TINY = dict(num_layers=1, attention_head_dim=8, num_attention_heads=2, text_dim=16)


def tiny_config(out, **kw):
    base = dict(steps=3, branches=2, seeds_per_prompt=2, prompts_per_iteration=1, iterations=4, lora_rank=4,
                lora_alpha=8, states_per_step=2, checkpoint_every=2, out=str(out), lr=1e-2)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def tiny_model():
    torch.manual_seed(0)
    return dg.DigitsModel(dg.DigitsConfig(**TINY))


def test_training_changes_every_trainable_weight_and_logs(tmp_path):
    cfg = tiny_config(tmp_path)
    initial = tiny_model()
    torch.manual_seed(cfg.seed)  # train() seeds the same way before attaching its LoRA adapters
    initial.use_lora(cfg.lora_rank, cfg.lora_alpha)
    before = [p.detach().clone() for p in initial.trainable_parameters()]
    model = tiny_model()
    cfg = tiny_config(tmp_path, eval_every=2, eval_steps=3, eval_per_prompt=2)
    metrics = train(model, "digits", DigitCorrectness(), cfg, eval_prompts="digits", log=lambda *_: None)
    after = list(model.trainable_parameters())
    assert len(after) == len(before)
    assert torch.equal(before[0], next(iter(initial.trainable_parameters())))
    # every adapter that can influence the output moves (SD3's last block has no context output to adapt)
    reachable = [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in after]
    assert sum(reachable) >= len(after) - 2
    for p, b, r in zip(after, before, reachable, strict=True):
        if r:
            assert not torch.equal(p, b)
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [m["iteration"] for m in lines] == [0, 1, 2, 3, 4] and metrics["iteration"] == 4
    assert [("eval/reward" in m) for m in lines] == [True, False, True, False, True]  # before, every 2, at the end
    assert {"reward/digit-correctness", "reward/digit-agreement"} <= set(lines[1])
    assert (
        0 <= lines[-1]["eval/digit-agreement"] <= 1 and lines[-1]["eval/reward"] == lines[-1]["eval/digit-correctness"]
    )
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["base_iteration"] == 0 and summary["final_iteration"] == 4
    assert summary["final"]["reward"] == lines[-1]["eval/reward"]
    assert json.load(open(tmp_path / "config.json"))["branches"] == 2
    from PIL import Image

    assert Image.open(tmp_path / "reward_curve.png").size == (640, 400)
    assert sorted(os.listdir(tmp_path / "samples")) == [
        "iteration00000.png",
        "iteration00002.png",
        "iteration00004.png",
    ]
    assert Image.open(tmp_path / "samples" / "iteration00004.png").size[0] > 0


KILLED_RUN = textwrap.dedent("""
    import os, sys, torch
    sys.path.insert(0, {root!r})
    from tests.test_trainer import tiny_config, tiny_model
    from tempflow.rewards import DigitCorrectness
    from tempflow.train.trainer import train
    reward = DigitCorrectness()
    calls = []
    def dying_reward(images, prompts, metadata):
        calls.append(1)
        if len(calls) == 4:  # in the 4th iteration's rollout: checkpoint of iteration 2, metrics up to 3
            os._exit(17)
        return reward(images, prompts, metadata)
    dying_reward.name = "digit-correctness"
    train(tiny_model(), "digits", dying_reward, tiny_config({out!r}, max_batch=1000), log=lambda *_: None)
""")


def test_a_killed_run_resumes_to_the_same_weights(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    killed = tmp_path / "killed"
    done = subprocess.run([sys.executable, "-c", KILLED_RUN.format(root=root, out=str(killed))], cwd=root)
    assert done.returncode == 17
    assert json.loads(open(killed / "metrics.jsonl").read().splitlines()[-1])["iteration"] == 3
    resumed = tiny_model()
    train(resumed, "digits", DigitCorrectness(), tiny_config(killed, max_batch=1000), resume=True, log=lambda *_: None)
    assert [json.loads(line)["iteration"] for line in open(killed / "metrics.jsonl")] == [1, 2, 3, 4]
    straight = tiny_model()
    train(
        straight, "digits", DigitCorrectness(), tiny_config(tmp_path / "straight", max_batch=1000), log=lambda *_: None
    )
    for a, b in zip(resumed.trainable_parameters(), straight.trainable_parameters(), strict=True):
        assert torch.equal(a, b)


def test_sample_from_a_run(tmp_path, capsys):
    from tempflow.train.trainer import load_run

    cfg = tiny_config(tmp_path / "run", iterations=2)
    trained = tiny_model()
    train(trained, "digits", DigitCorrectness(), cfg, log=lambda *_: None)
    again = load_run(tiny_model(), str(tmp_path / "run"))
    for a, b in zip(trained.trainable_parameters(), again.trainable_parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_run(tiny_model(), str(tmp_path / "nothing"))


def test_eval_command(tmp_path, capsys):
    assert cli.main(["eval", "--steps", "4", "--per-prompt", "2"]) == 0
    out = capsys.readouterr().out
    assert "10 prompts (digits) x 2 = 20 samples" in out and "T=4" in out and "digit-agreement" in out
    assert cli.main(["eval", "--run", str(tmp_path / "missing")]) == 2
    assert "not a tempflow run folder" in capsys.readouterr().err


def test_cli_settings(tmp_path, capsys):
    assert cli.main(["train", "--help-config"]) == 0
    assert "clip_eps" in capsys.readouterr().out
    assert cli.main(["train", "--set", "bogus=1"]) == 2
    assert "unknown setting 'bogus'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="method='ddpo'"):
        TrainConfig(method="ddpo")


def _trained(tmp_path, name, **kw):
    model = tiny_model()
    train(model, "digits", DigitCorrectness(), tiny_config(tmp_path / name, iterations=2, **kw), log=lambda *_: None)
    return model


def test_gradient_checkpointing_gives_the_same_training(tmp_path):
    plain = _trained(tmp_path, "plain")
    ckpt = _trained(tmp_path, "ckpt", grad_checkpointing=True)
    assert ckpt.transformer.is_gradient_checkpointing
    for a, b in zip(plain.trainable_parameters(), ckpt.trainable_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_bf16_weights_train_fp32_adapters(tmp_path):
    model = _trained(tmp_path, "bf16", dtype="bf16")
    assert model.transformer.pos_embed.proj.weight.dtype == torch.bfloat16
    params = list(model.trainable_parameters())
    assert params and all(p.dtype == torch.float32 for p in params)
    assert all(torch.isfinite(p).all() for p in params)
    fp32 = _trained(tmp_path, "fp32")
    moved = [not torch.equal(p, q) for p, q in zip(params, fp32.trainable_parameters(), strict=True)]
    assert any(moved)  # a different run, but a close one: bf16 forwards, fp32 maths
    rewards = [json.loads(line)["reward"] for line in open(tmp_path / "bf16" / "metrics.jsonl")]
    assert rewards[0] == pytest.approx(json.loads(open(tmp_path / "fp32" / "metrics.jsonl").readline())["reward"],
                                       abs=0.05)  # fmt: skip


def test_full_fine_tuning_keeps_a_frozen_reference(tmp_path):
    base = tiny_model()
    x = torch.randn(3, *base.latent_shape)
    cond = base.encode(["a 1", "a 2", "a 3"])
    index = torch.arange(3)
    with torch.no_grad():
        v0 = base.velocity(x, 0.5, cond, index, 2.0)
    model = _trained(tmp_path, "full", lora_rank=0, beta=0.5, lr=1e-3)
    assert model.transformer.pos_embed.proj.weight.requires_grad
    with torch.no_grad():
        v1 = model.velocity(x, 0.5, cond, index, 2.0)
        with model.reference():
            v_ref = model.velocity(x, 0.5, cond, index, 2.0)
        again = model.velocity(x, 0.5, cond, index, 2.0)
    assert not torch.allclose(v1, v0)
    torch.testing.assert_close(v_ref, v0)  # the frozen copy is the model before training
    torch.testing.assert_close(again, v1)  # and the trained weights come back after the block
    kls = [json.loads(line)["kl"] for line in open(tmp_path / "full" / "metrics.jsonl")]
    assert kls[-1] > 0  # the KL term sees the drift from the reference


def test_tensorboard_log(tmp_path):
    pytest.importorskip("tensorboard")
    _trained(tmp_path, "tb", tensorboard=True)
    events = [f for f in os.listdir(tmp_path / "tb" / "tensorboard") if f.startswith("events.out")]
    assert events and os.path.getsize(tmp_path / "tb" / "tensorboard" / events[0]) > 100


def test_ranks_without_deepspeed_are_refused():
    with pytest.raises(RuntimeError, match="zero_stage=2 or 3"):
        from tempflow.train import distributed

        os.environ["WORLD_SIZE"] = "2"
        try:
            distributed.start(None, [], None, 0, 1.0)
        finally:
            del os.environ["WORLD_SIZE"]
