"""Faults a run folder must survive (issue 12): concurrent runs, incompatible resumes, damaged checkpoints, kills and
signals; after each recoverable one the run reaches the metrics and weights of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from tempflow import cli  # noqa: E402
from tempflow.rewards import DigitCorrectness  # noqa: E402
from tempflow.train.runfolder import CheckpointError, RunFolderError  # noqa: E402
from tempflow.train.trainer import run_checkpoint, run_config, train  # noqa: E402
from tests.test_trainer import tiny_config, tiny_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = dict(log=lambda *_: None)


def run(out, resume=False, **kw):
    model = tiny_model()
    train(model, "digits", DigitCorrectness(), tiny_config(out, **{"max_batch": 1000, **kw}), resume=resume, **QUIET)
    return model


def metrics(out):
    """metrics.jsonl without the timings."""
    lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return [{k: v for k, v in m.items() if not k.endswith("_s")} for m in lines]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted 6-iteration run every recovered run must reach."""
    out = tmp_path_factory.mktemp("straight")
    model = run(out, iterations=6)
    return [p.detach().clone() for p in model.trainable_parameters()], metrics(out)


def assert_reached(model, out, straight):
    weights, lines = straight
    for a, b in zip(model.trainable_parameters(), weights, strict=True):
        assert torch.equal(a, b)
    assert metrics(out) == lines


# ---- the lock and fresh runs ------------------------------------------------------------------------------------

HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from tempflow.train.runfolder import RunFolder
    from tempflow.train.trainer import TrainConfig
    folder = RunFolder({out!r})  # held until the process ends
    folder.open(TrainConfig(out={out!r}))
    print("locked", flush=True)
    time.sleep(120)
""")


def test_a_second_process_on_the_same_folder_fails_at_once_and_a_dead_holder_is_taken_over(tmp_path):
    out = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER.format(root=ROOT, out=out)], stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        start = time.perf_counter()
        with pytest.raises(RunFolderError, match=rf"in use by another tempflow process \(pid {holder.pid} on "):
            run(out, iterations=2)
        assert time.perf_counter() - start < 5  # at once, before any model work
    finally:
        holder.kill()  # SIGKILL: the lock file stays, the kernel drops the lock
        holder.wait()
    assert os.path.exists(os.path.join(out, ".lock"))
    run(out, iterations=2)  # the stale lock is taken over
    assert json.load(open(os.path.join(out, ".lock")))["pid"] == os.getpid()


def test_a_fresh_run_never_replaces_a_run_unless_asked(tmp_path):
    out = str(tmp_path / "run")
    run(out, iterations=4)
    before = open(os.path.join(out, "checkpoint.pt"), "rb").read()
    with pytest.raises(RunFolderError, match=r"holds a run \(checkpoint at iteration 4\).*--resume.*--overwrite"):
        run(out, iterations=1)
    assert open(os.path.join(out, "checkpoint.pt"), "rb").read() == before
    (tmp_path / "run" / "mine.txt").write_text("not the run's")
    model = tiny_model()
    train(model, "digits", DigitCorrectness(), tiny_config(out, iterations=1), overwrite=True, **QUIET)
    assert run_checkpoint(out)["iteration"] == 1 and [m["iteration"] for m in metrics(out)] == [1]
    assert not os.path.exists(os.path.join(out, "checkpoint.prev.pt"))
    assert (tmp_path / "run" / "mine.txt").read_text() == "not the run's"  # only the run's own files go


def test_resume_with_nothing_to_resume(tmp_path):
    out = str(tmp_path / "empty")
    with pytest.raises(RunFolderError, match="nothing to resume.*no checkpoint"):
        run(out, resume=True, iterations=2)
    run(out, resume="auto", iterations=2)  # auto: fresh when there is nothing
    assert run_checkpoint(out)["iteration"] == 2
    run(out, resume="auto", iterations=3)  # and a resume when there is
    assert [m["iteration"] for m in metrics(out)] == [1, 2, 3]


# ---- resume with other settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, shown",
    [
        (dict(lr=2e-2), "lr: run 0.01, now 0.02"),
        (dict(branches=3), "branches: run 2, now 3"),
        (dict(seed=1), "seed: run 0, now 1"),
        (dict(method="flow-grpo"), "method: run 'tempflow', now 'flow-grpo'"),
        (dict(lora_rank=8), "lora_rank: run 4, now 8"),
    ],
)
def test_resume_refuses_settings_that_change_the_experiment(tmp_path, change, shown):
    out = str(tmp_path / "run")
    run(out, iterations=2)
    config = open(os.path.join(out, "config.json")).read()
    with pytest.raises(RunFolderError, match="change the experiment.*" + shown.replace("(", r"\(")):
        run(out, resume=True, iterations=4, **change)
    assert open(os.path.join(out, "config.json")).read() == config  # never overwritten
    assert run_checkpoint(out)["iteration"] == 2


def test_resume_takes_harmless_changes_and_records_them(tmp_path, straight):
    out = str(tmp_path / "run")
    run(out, iterations=3, checkpoint_every=3)
    config = open(os.path.join(out, "config.json")).read()
    model = run(out, resume=True, iterations=6, checkpoint_every=1)
    assert open(os.path.join(out, "config.json")).read() == config
    history = [json.loads(line) for line in open(os.path.join(out, "config_history.jsonl"))]
    assert history[0]["resumed_at"] == 3 and history[0]["changes"]["iterations"] == [3, 6]
    assert history[0]["changes"]["checkpoint_every"] == [3, 1] and len(history[0]["changes"]) == 2
    assert run_config(out).iterations == 6 and run_config(out).checkpoint_every == 1
    assert_reached(model, out, straight)


# ---- damaged checkpoints ----------------------------------------------------------------------------------------


def damage(path, how):
    data = open(path, "rb").read()
    with open(path, "wb") as fh:
        fh.write({"truncated": data[: len(data) // 2], "random": os.urandom(4096), "empty": b""}[how])


@pytest.mark.parametrize("how", ["truncated", "random", "empty"])
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, straight, how, capsys):
    out = str(tmp_path / "run")
    run(out, iterations=4)  # checkpoints at 2 (kept as checkpoint.prev.pt) and 4
    damage(os.path.join(out, "checkpoint.pt"), how)
    # eval / sample read the previous one too, and say so
    assert run_checkpoint(out)["iteration"] == 2
    assert "checkpoint.pt is damaged" in capsys.readouterr().out
    lines = []
    model = tiny_model()
    train(model, "digits", DigitCorrectness(), tiny_config(out, max_batch=1000, iterations=6), resume=True,
          log=lines.append)  # fmt: skip
    warning = next(line for line in lines if "damaged" in line)
    assert f"{os.path.join(out, 'checkpoint.pt')} is damaged (" in warning
    assert "using the previous checkpoint" in warning and "(iteration 2)" in warning
    assert os.path.exists(os.path.join(out, "checkpoint.pt.damaged"))
    assert_reached(model, out, straight)


def test_no_readable_checkpoint_names_the_files_and_how_to_start_over(tmp_path):
    out = str(tmp_path / "run")
    run(out, iterations=4)
    damage(os.path.join(out, "checkpoint.pt"), "random")
    damage(os.path.join(out, "checkpoint.prev.pt"), "empty")
    with pytest.raises(CheckpointError) as err:
        run(out, resume=True, iterations=6)
    text = str(err.value)
    assert "checkpoint.pt is damaged" in text
    assert "checkpoint.prev.pt is damaged (ValueError: the file is empty)" in text
    assert "--overwrite" in text
    assert cli.main(["eval", "--run", out, "--per-prompt", "1", "--steps", "2"]) == 2


# ---- kills and signals ------------------------------------------------------------------------------------------

DYING = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {root!r})
    from tests.test_trainer import tiny_config, tiny_model
    from tempflow.rewards import DigitCorrectness
    from tempflow.train.trainer import Interrupted, train
    calls = []
    class Reward(DigitCorrectness):
        def detailed(self, images, prompts, metadata=None):
            calls.append(1)
            if len(calls) == {at}:  # in iteration {at}'s rollout
                {action}
            return super().detailed(images, prompts, metadata)
    rollout_reward = Reward()
    try:
        train(tiny_model(), "digits", rollout_reward, tiny_config({out!r}, max_batch=1000, iterations=6, **{kw!r}),
              log=print)
    except Interrupted as stop:
        print(stop, flush=True)
        sys.exit(stop.exit_code)
""")


def dying_run(out, at, action, **kw):
    script = DYING.format(root=ROOT, out=str(out), at=at, action=action, kw=kw)
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_a_kill_loses_at_most_checkpoint_minutes(tmp_path, straight):
    out = tmp_path / "run"
    # checkpoint_every=100: only the time-based checkpoint (every 0.01 s here, so after each iteration) saves
    done = dying_run(out, 4, "os.kill(os.getpid(), signal.SIGKILL)", checkpoint_every=100, checkpoint_minutes=1e-4)
    assert done.returncode == -signal.SIGKILL
    assert run_checkpoint(str(out))["iteration"] == 3
    model = run(out, resume=True, iterations=6, checkpoint_every=100, checkpoint_minutes=1e-4)
    assert_reached(model, out, straight)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_at_the_next_iteration_with_a_checkpoint(tmp_path, straight, sig):
    out = tmp_path / "run"
    # the signal arrives during iteration 3's rollout: the iteration finishes, is saved, and the run stops
    done = dying_run(out, 3, f"os.kill(os.getpid(), {int(sig)})", checkpoint_every=100, checkpoint_minutes=0)
    assert done.returncode == 128 + sig, done.stderr[-2000:]
    assert f"stopped by {signal.Signals(sig).name} after iteration 3" in done.stdout
    assert "Traceback" not in done.stderr
    assert run_checkpoint(str(out))["iteration"] == 3
    model = run(out, resume=True, iterations=6, checkpoint_every=100, checkpoint_minutes=0)
    assert_reached(model, out, straight)


@pytest.mark.slow
def test_ctrl_c_on_the_command_line(tmp_path):
    """A real `tempflow train` process: a second one on its folder fails, SIGINT stops it with exit code 130 and the
    command to continue, which then finishes the run."""
    out = str(tmp_path / "run")
    sets = [f"out={out}", "iterations=40", "steps=3", "branches=2", "seeds_per_prompt=2", "prompts_per_iteration=1",
            "eval_prompts=", "checkpoint_every=100"]  # fmt: skip
    cmd = [sys.executable, "-m", "tempflow.cli", "train", *[a for s in sets for a in ("--set", s)]]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # wait for the first trained iteration
        lines.append(line)
        if line.startswith("[1/40"):
            break
    assert cli.main(["train", *cmd[4:]]) == 2  # the folder is locked by the running process
    proc.send_signal(signal.SIGINT)
    lines += proc.stdout.readlines()
    assert proc.wait(timeout=120) == 130
    text = "".join(lines)
    assert "SIGINT: stopping after this iteration" in text and "Traceback" not in text
    again = text.split("continue with: ")[1].strip()
    assert again.endswith("--resume")
    stopped = run_checkpoint(out)["iteration"]
    assert stopped >= 1
    resumed = subprocess.run([sys.executable, "-m", "tempflow.cli", *again.split()[1:], "--set", "iterations=" +
                              str(stopped + 1)], cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [m["iteration"] for m in metrics(out)] == list(range(1, stopped + 2))


# ---- bad command-line input -------------------------------------------------------------------------------------


def test_bad_command_line_input_gets_a_clear_error(tmp_path, capsys):
    assert cli.main(["sample", "--scale", "0"]) == 2
    assert "--scale must be positive" in capsys.readouterr().err
    assert cli.main(["sample", "a handwritten 3", "  ", "--out", str(tmp_path / "x.png")]) == 2
    assert "an empty prompt" in capsys.readouterr().err
    folder = tmp_path / "only_index"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    assert cli.main(["sample", "a fox", "--model", str(folder), "--out", str(tmp_path / "y.png")]) == 2
    err = capsys.readouterr().err
    assert "model_index.json" in err and "_class_name" not in err.split("model_index.json")[0][-40:]
    with pytest.raises(SystemExit):
        cli.main(["train", "--eval-per-digit", "0"])
    assert "unrecognized arguments: --eval-per-digit" in capsys.readouterr().err
    assert cli.main(["train", "--resume", "--overwrite", "--set", f"out={tmp_path / 'r'}"]) == 2
    assert "contradict" in capsys.readouterr().err
    for command in ("train", "eval", "sample", "serve-reward", "tiny-model", "pretrain", "demo", "doctor"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        text = capsys.readouterr().out
        assert len(text.split("\n\n")[1].strip()) > 20, command  # a description of what the command does
