"""The trainer and the engine on a CUDA device (skipped without one; bench/gpu_check.sh runs it on a lent GPU, with
diffusers and peft carried as wheels): latents and step tables on the GPU, index columns on the CPU."""

import json

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_training_and_evaluation_on_the_gpu(tmp_path):
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from tempflow.models import load_model
    from tempflow.train import train
    from tests.test_trainer import tiny_config

    def run(device):
        cfg = tiny_config(tmp_path / device, iterations=2, eval_steps=3, eval_per_prompt=2, device=device)
        model = load_model("digits", device=device)
        metrics = train(model, "digits", "digit-correctness", cfg, eval_prompts="digits", log=lambda *_: None)
        return metrics, [json.loads(line) for line in open(tmp_path / device / "metrics.jsonl")]

    gpu, gpu_lines = run("cuda")
    cpu, cpu_lines = run("cpu")
    assert gpu["trained_states"] > 0 and "eval/digit-agreement" in gpu
    # the same counter-based noise on both devices: the first rollout's rewards agree to float rounding
    assert gpu_lines[1]["reward"] == pytest.approx(cpu_lines[1]["reward"], abs=2e-3)
    assert gpu_lines[0]["eval/reward"] == pytest.approx(cpu_lines[0]["eval/reward"], abs=2e-3)
