"""bench/gpu_check.sh and its real-size part, bench/gpu_real_size.py, between GPU sessions: what can run without a
GPU runs here, so that the one command for a lent GPU cannot rot. The dry run builds the published SD3.5-Medium and
FLUX.1-dev configurations on the meta device (parameter counts, latent shapes, FLOPs) and writes the results file;
the smoke run takes every section end to end on tiny configurations of the same classes on the CPU; a planted
wrong result must fail the run."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("diffusers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_real_size.py")
CHECK = os.path.join(ROOT, "bench", "gpu_check.sh")


@pytest.fixture(scope="module")
def grs():
    spec = importlib.util.spec_from_file_location("gpu_real_size", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_real_size"] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def read(out) -> list[dict]:
    with open(os.path.join(out, "gpu_real_size.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def checks(lines) -> list[dict]:
    return [r for r in lines if "check" in r]


def test_gpu_check_script_parses_and_ends_with_the_real_size_check():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    subprocess.run([bash, "-n", CHECK], check=True)
    text = open(CHECK).read()
    assert "bench/gpu_real_size.py" in text and "gpu_real_size.log" in text
    assert "--budget-s" in text


def test_dry_run_builds_the_published_configs_on_the_meta_device(tmp_path):
    """The command-line entry as gpu_check.sh calls it, with --dry-run: no GPU, nothing downloaded."""
    start = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    proc = subprocess.run([sys.executable, SCRIPT, "--dry-run", "--out", str(tmp_path)], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert time.perf_counter() - start < 60  # about 10 s; the bound only catches a run gone wrong
    lines = read(tmp_path)
    head = lines[0]["header"]
    for key in ("gpu", "torch", "triton", "diffusers", "commit", "time"):
        assert key in head
    assert head["mode"] == "dry-run" and head["torch"] == torch.__version__ and head["commit"]
    assert all(c["ok"] for c in checks(lines)), checks(lines)
    configs = {r["model"]: r for r in lines if r.get("section") == "config" and "model" in r}
    # SD3.5-Medium: 2.24B weights + the 0.23B position table diffusers keeps as a buffer (the published ~2.5B);
    # FLUX.1-dev: ~12B
    assert 2.2e9 < configs["sd3.5-medium"]["params"] < 2.3e9
    assert 2.4e9 < configs["sd3.5-medium"]["total"] < 2.55e9
    assert 11.8e9 < configs["flux.1-dev"]["total"] < 12.0e9
    assert configs["sd3.5-medium"]["config"]["dual_attention_layers"] == list(range(13))
    plans = {(r["model"], r["res"]): r for r in lines if r.get("section") == "plan"}
    assert plans["sd3.5-medium", 512]["latent_shape"] == [16, 64, 64]
    assert plans["sd3.5-medium", 1024]["latent_shape"] == [16, 128, 128]
    assert plans["flux.1-dev", 512]["latent_shape"] == [1024, 64]
    assert plans["flux.1-dev", 1024]["latent_shape"] == [4096, 64]
    assert plans["sd3.5-medium", 512]["rows_per_sample"] == 2 and plans["flux.1-dev", 512]["rows_per_sample"] == 1
    # N=4, K=6, T=10: 9 + 6 * 45 = 279 forwards per seed, a CFG pair for SD3
    assert plans["sd3.5-medium", 512]["rollout_rows"] == 4 * 279 * 2
    assert 1.5 < plans["sd3.5-medium", 512]["TFLOP_per_row"] < 3.5
    assert plans["flux.1-dev", 1024]["TFLOP_per_row"] > plans["flux.1-dev", 512]["TFLOP_per_row"] > 10
    summary = lines[-1]["summary"]
    assert summary["failures"] == []


def test_arguments_are_checked(grs):
    for bad in (["--seeds", "0"], ["--resolutions", "500"], ["--max-batch", "1"], ["--models", "sdxl"],
                ["--sections", "everything"]):  # fmt: skip
        with pytest.raises(SystemExit) as exc:
            grs.parse_args(bad)
        assert exc.value.code == 2
    args = grs.parse_args(["--dry-run", "--out", "x"])
    assert (args.seeds, args.branches, args.steps, args.resolutions) == (4, 6, 10, [512, 1024])
    assert args.dtype == "bf16" and args.max_batch == 48
    smoke = grs.parse_args(["--smoke", "--out", "x"])
    assert (smoke.seeds, smoke.branches, smoke.steps, smoke.device, smoke.dtype) == (2, 2, 4, "cpu", "fp32")


def test_the_published_config_names_are_diffusers_arguments(grs):
    for spec in (*grs.SPECS.values(), *grs.TINY_SPECS.values()):
        assert grs.check_config_names(spec) == []


def test_commit_falls_back_without_git(grs, monkeypatch, tmp_path):
    monkeypatch.setenv("TEMPFLOW_COMMIT", "abc123")
    assert grs.git_commit() == "abc123"
    monkeypatch.delenv("TEMPFLOW_COMMIT")
    monkeypatch.setattr(grs, "ROOT", str(tmp_path))  # a copy of the tree without .git, as on the GPU machine
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert grs.git_commit() == "unknown"
    (tmp_path / ".git" / "refs" / "heads").mkdir(parents=True)
    (tmp_path / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (tmp_path / ".git" / "refs" / "heads" / "main").write_text("f" * 40 + "\n")
    monkeypatch.setenv("PATH", "")  # no git program: read by hand
    assert grs.git_commit() == "f" * 40


def test_a_section_past_its_deadline_is_stopped_and_reported(grs, tmp_path):
    rec = grs.Recorder(str(tmp_path), {"gpu": "none"})
    args = grs.parse_args(["--smoke", "--out", str(tmp_path), "--grace-s", "0.2"])
    budget = grs.Budget(0.0)
    assert grs.guarded(rec, "sleepy", lambda: time.sleep(5), budget, args) is None
    assert grs.guarded(rec, "broken", lambda: 1 / 0, budget, args) is None
    assert grs.guarded(rec, "fine", lambda: 7, budget, args) == 7
    rec.close({})
    assert rec.skips and "sleepy" in rec.skips[0] and rec.failures and "broken" in rec.failures[0]


def test_the_rollout_estimate_follows_the_forward_table(grs):
    from tempflow.rollout import BranchPlan

    plan = BranchPlan.tempflow(10, 6)
    table = {1: 0.01, 6: 0.03, 24: 0.1}  # seconds per velocity of that many samples
    est = grs.rollout_estimate(table, plan, 4, 1, 24)
    samples = 4 * plan.model_calls_per_seed()  # 1116
    assert est["engine"] == pytest.approx(1.15 * ((samples // 24) * 0.1 + grs.per_call(table, samples % 24)))
    assert est["naive"] == pytest.approx(1.1 * 4 * (9 * 0.01 + 45 * 0.03))
    assert grs.per_call(table, 48) == pytest.approx(0.2) and grs.per_call(table, 15) == pytest.approx(0.065)


@pytest.mark.slow
def test_smoke_runs_every_section_and_every_check_passes(grs, tmp_path):
    assert grs.main(["--smoke", "--device", "cpu", "--out", str(tmp_path)]) == 0
    lines = read(tmp_path)
    assert lines[0]["header"]["mode"] == "smoke"
    assert checks(lines) and all(c["ok"] for c in checks(lines)), [c for c in checks(lines) if not c["ok"]]
    rows = [r for r in lines if "section" in r and "check" not in r]
    kernels = {(r["size"], r["mode"]) for r in rows if r["section"] == "kernels"}
    assert {m for _, m in kernels} == {"sample", "score", "loss fwd+bwd"} and len(kernels) == 4 * 3
    variants = {(r["model"], r["res"], r["variant"]) for r in rows if r["section"] == "rollout"}
    for model in ("sd3-tiny", "flux-tiny"):
        for res in (32, 48):
            assert {(model, res, "naive (official)"), (model, res, "engine")} <= variants
    assert ("sd3-tiny", 32, "engine compiled dynamo-eager") in variants
    train = {(r["model"], r["variant"]) for r in rows if r["section"] == "train"}
    assert train == {(m, f"one forward {v}") for m in ("sd3-tiny", "flux-tiny") for v in ("per state", "per action")}
    assert lines[-1]["summary"]["failures"] == []


@pytest.mark.slow
def test_a_wrong_result_fails_loudly(grs, tmp_path, monkeypatch):
    import tempflow.rollout
    from tempflow import ops

    real_rollout, real_score = tempflow.rollout.rollout, ops.branch_score

    def wrong_rows(*args, **kwargs):
        batch = real_rollout(*args, **kwargs)
        batch.action = batch.action.flip(0)  # every row gets another row's action
        return batch

    def wrong_score(*args, **kwargs):
        return real_score(*args, **kwargs) + 0.01

    monkeypatch.setattr(tempflow.rollout, "rollout", wrong_rows)
    monkeypatch.setattr(ops, "branch_score", wrong_score)
    argv = ["--smoke", "--out", str(tmp_path), "--models", "sd3.5-medium", "--resolutions", "32", "--sections",
            "kernels", "rollout"]  # fmt: skip
    assert grs.main(argv) == 1
    failed = [c["check"] for c in checks(read(tmp_path)) if not c["ok"]]
    assert "engine rows = naive rows" in failed
    assert "fused log-probs of the eager samples = the eager log-probs" in failed


def test_out_of_budget_sections_are_skipped_not_failed(grs, tmp_path):
    argv = ["--smoke", "--out", str(tmp_path), "--models", "flux.1-dev", "--resolutions", "32", "--sections",
            "rollout", "train", "--budget-s", "0"]  # fmt: skip
    assert grs.main(argv) == 0
    lines = read(tmp_path)
    skipped = [r["section"] for r in lines if "skipped" in r]
    assert "rollout flux-tiny 32px" in skipped and "train flux-tiny 32px" in skipped
    assert not any(r.get("section") == "rollout" and "variant" in r for r in lines)
