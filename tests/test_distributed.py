"""ZeRO-2/3 on 2 CPU processes (gloo), launched by torchrun, against the single-process trainer."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("deepspeed")
pytest.importorskip("peft")

from tempflow.rewards import DigitCorrectness  # noqa: E402
from tempflow.train.trainer import train  # noqa: E402
from tests.test_trainer import tiny_config, tiny_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RANK_SCRIPT = textwrap.dedent("""
    import json, os, sys, torch
    sys.path.insert(0, {root!r})
    from tests.test_trainer import tiny_config, tiny_model
    from tempflow.rewards import DigitCorrectness
    from tempflow.train.trainer import train
    reward = scorer = DigitCorrectness()
    if os.environ.get("FLAT_REWARD_RANK") == os.environ["RANK"]:  # this rank's groups carry no signal at all
        reward = lambda images, prompts, metadata: torch.full((len(images),), 0.5)
        reward.name = "flat"
    model = tiny_model()
    train(model, "digits", reward, tiny_config({out!r}, **{settings!r}), resume={resume!r}, log=lambda *_: None)
    # the reward model was never handed to DeepSpeed: full weights on every rank, not ZeRO-3 partitions
    checks = {{"reward_partitioned": any(hasattr(p, "ds_id") for p in scorer.model.parameters()),
              "reward_numel": sum(p.numel() for p in scorer.model.parameters()),
              "model_partitioned": all(hasattr(p, "ds_id") for p in model.trainable_parameters())}}
    with open(os.path.join({out!r}, f"rank{{os.environ['RANK']}}.json"), "w") as fh:
        json.dump(checks, fh)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out, settings: dict, resume=False, nproc=2, **env) -> subprocess.CompletedProcess:
    script = out.parent / f"{out.name}_rank.py"
    script.write_text(RANK_SCRIPT.format(root=ROOT, out=str(out), settings=settings, resume=resume))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={_free_port()}",
           str(script)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, **env}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def metrics(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


ZERO3 = dict(prompts_per_iteration=2, iterations=3, checkpoint_every=3, zero_stage=3, max_batch=1000, beta=0.05)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_on_two_processes_matches_one_process(tmp_path, stage):
    extensions = tmp_path / "torch_extensions"  # a fresh cache: a compiled DeepSpeed op would land here
    extensions.mkdir()
    done = launch(tmp_path / "zero3", {**ZERO3, "zero_stage": stage}, TORCH_EXTENSIONS_DIR=str(extensions))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # on CPU nothing is compiled (DeepSpeed's shared-memory all-reduce op, inference-only, is skipped)
    assert list(extensions.iterdir()) == []
    for text in ("Building extension", "built successfully"):
        assert text not in done.stdout + done.stderr, text
    single = tmp_path / "single"
    model = tiny_model()
    train(model, "digits", DigitCorrectness(), tiny_config(single, **{**ZERO3, "zero_stage": 0}), log=lambda *_: None)
    two, one = metrics(tmp_path / "zero3"), metrics(single)
    assert len(two) == len(one) == 3
    for a, b in zip(two, one, strict=True):
        assert a["trained_states"] == b["trained_states"]
        for key in ("reward", "final_reward", "loss", "kl"):
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-5), (key, a, b)
    dist_ckpt = torch.load(tmp_path / "zero3" / "checkpoint.pt", weights_only=False)
    one_ckpt = torch.load(single / "checkpoint.pt", weights_only=False)
    for part in ("params", "ema"):
        for a, b in zip(dist_ckpt[part], one_ckpt[part], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    for rank in (0, 1):
        checks = json.load(open(tmp_path / "zero3" / f"rank{rank}.json"))
        assert checks == {"reward_partitioned": False, "model_partitioned": stage == 3,
                          "reward_numel": sum(p.numel() for p in DigitCorrectness().model.parameters())}  # fmt: skip


@pytest.mark.slow
def test_zero3_resume_continues_exactly(tmp_path):
    out = tmp_path / "run"
    first = launch(out, {**ZERO3, "iterations": 2, "checkpoint_every": 1})
    assert first.returncode == 0, first.stderr[-3000:]
    tags = [name for name in os.listdir(out / "deepspeed") if name.startswith("iteration")]
    assert sorted(tags) == ["iteration1", "iteration2"]  # those of checkpoint.pt and checkpoint.prev.pt only
    resumed = launch(out, ZERO3, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    tags = [name for name in os.listdir(out / "deepspeed") if name.startswith("iteration")]
    assert sorted(tags) == ["iteration2", "iteration3"]  # iteration1's partitions, named by no checkpoint, are gone
    straight = launch(tmp_path / "straight", ZERO3)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert [m["loss"] for m in metrics(out)] == [m["loss"] for m in metrics(tmp_path / "straight")]
    a = torch.load(out / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    for x, y in zip(a["params"] + a["ema"], b["params"] + b["ema"], strict=True):
        assert torch.equal(x, y)


@pytest.mark.slow
def test_a_rank_with_nothing_to_train_keeps_step_with_the_others(tmp_path):
    """Rank 1's rewards are all equal, so it has no state to train; it must still join every collective forward."""
    done = launch(tmp_path / "flat", {**ZERO3, "iterations": 2}, FLAT_REWARD_RANK="1")
    assert done.returncode == 0, done.stderr[-3000:]
    both = metrics(tmp_path / "flat")
    assert len(both) == 2 and all(m["trained_states"] > 0 for m in both)  # rank 0's states only
