"""The trainer on real model families: each example config of configs/ for 2 iterations on a tiny random-weight model
of its family (only the model path, the resolution, the sizes and the data paths overridden), then `tempflow eval` on
the run; the whole workflow by the CLI alone with a reward served over loopback; ZeRO-3 on 2 processes."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from tempflow import cli  # noqa: E402
from tempflow.models.tiny import save_tiny  # noqa: E402
from tempflow.rewards.base import FunctionReward  # noqa: E402
from tempflow.rewards.remote import serve  # noqa: E402
from tempflow.train.config import TrainConfig  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
SIZES = ["steps=3", "branches=2", "seeds_per_prompt=2", "prompts_per_iteration=1", "iterations=2", "eval_steps=2",
         "eval_per_prompt=1", "max_sequence_length=16", "checkpoint_every=1", "tensorboard=false"]  # fmt: skip
PROMPTS = ["a red fox", "two cats", "a blue bird on a tree"]
GENEVAL = [
    {"prompt": "two cats", "tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": []},
    {"prompt": "a red apple", "tag": "colors", "include": [{"class": "apple", "color": "red"}], "exclude": []},
    {"prompt": "a dog", "tag": "single_object", "include": [{"class": "dog"}], "exclude": [{"class": "cat"}]},
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny random-weight SD3, FLUX, Qwen-Image, Wan and FLUX.2 pipeline folders, a tiny CLIP folder (PickScore's
    format), prompt files."""
    root = tmp_path_factory.mktemp("tiny")
    out = {kind: save_tiny(kind, str(root / kind)) for kind in ("sd3", "flux", "qwenimage", "wan", "zimage", "flux2",
                                                                 "clip")}  # fmt: skip
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (root / "geneval.jsonl").write_text("\n".join(json.dumps(r) for r in GENEVAL) + "\n")
    out["txt"], out["jsonl"] = str(root / "prompts.txt"), str(root / "geneval.jsonl")
    return out


def geneval_stand_in(images, prompts, metadata):
    """Stands in for a GenEval scorer behind the reward server: it needs each prompt's GenEval metadata."""
    for m in metadata:
        if not {"tag", "include", "exclude"} <= set(m):
            raise ValueError(f"GenEval metadata missing: {m}")
    return images.mean(dim=(1, 2, 3)) * torch.tensor([1.0 + len(m["include"]) for m in metadata])


def run_cli(*args) -> None:
    assert cli.main(list(args)) == 0


def check_run(out, model, prompts, part_names):
    lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [m["iteration"] for m in lines] == [0, 1, 2]
    assert "eval/reward" in lines[0] and "eval/reward" in lines[2] and lines[1]["trained_states"] > 0
    assert {f"reward/{n}" for n in part_names} <= set(lines[1]) and {f"eval/{n}" for n in part_names} <= set(lines[2])
    saved = json.load(open(os.path.join(out, "config.json")))
    assert saved["model"] == model and saved["prompts"] == prompts  # the run records what it trained
    assert os.listdir(os.path.join(out, "samples")) and os.path.exists(os.path.join(out, "checkpoint.pt"))


def assert_paper_settings(paper):
    """An example config keeps the paper's algorithm settings (T, K, N, LoRA, clip range, learning rate)."""
    settings = (paper.steps, paper.branches, paper.seeds_per_prompt, paper.lora_rank, paper.lora_alpha)
    assert settings == (10, 6, 4, 32, 64)
    assert paper.clip_eps == 1e-4 and paper.lr == 3e-4


@pytest.mark.parametrize("config", ["sd35m_pickscore.yaml", "sd35m_geneval_server.yaml", "flux_dev_hps.yaml",
                                    "qwenimage_pickscore.yaml", "zimage_pickscore.yaml"])  # fmt: skip
def test_example_config_on_a_tiny_model_of_its_family(config, tiny, tmp_path, capsys):
    path = os.path.join(CONFIGS, config)
    paper = TrainConfig.from_sources(path)
    assert_paper_settings(paper)
    family = {"sd35m": "sd3", "flux": "flux", "qwenimage": "qwenimage", "zimage": "zimage"}[config.split("_")[0]]
    tokens = 0 if family == "zimage" else 128  # Z-Image: the family's own (512, the pipeline's; truncation only)
    assert paper.max_sequence_length == tokens
    out = str(tmp_path / "run")
    sets = [f"model={tiny[family]}", f"resolution={32 if family == 'sd3' else 16}", f"out={out}", *SIZES]
    server = None
    if "geneval" in config:
        server = serve(FunctionReward(geneval_stand_in, "geneval-stand-in"))
        sets += [f"prompts={tiny['jsonl']}", f"eval_prompts={tiny['jsonl']}",
                 f"reward={{geneval: {{url: {server.url}, weight: 1.0, timeout: 60}}}}"]  # fmt: skip
        parts = ["geneval"]
    else:
        sets += [f"prompts={tiny['txt']}", f"eval_prompts={tiny['txt']}"]
        parts = list(paper.reward)
        if "hpsv2" in paper.reward:  # no HPS v2 checkpoint offline: a CLIP reward of the same kind stands in
            try:
                import open_clip  # noqa: F401
            except ImportError:  # and without open_clip, building it says what to install
                from tempflow.rewards.registry import build_reward

                with pytest.raises(ImportError, match="HPSv2 needs open_clip: pip install open_clip_torch"):
                    build_reward({"hpsv2": {"checkpoint": path}})
            parts = ["pickscore"]
        sets.append(f"reward={{pickscore: {{weight: 1.0, path: {tiny['clip']}}}}}")
    try:
        run_cli("train", "--config", path, *[a for s in sets for a in ("--set", s)])
        check_run(out, tiny[family], tiny["jsonl" if "geneval" in config else "txt"], parts)
        run_cli("eval", "--run", out, "--steps", "2")  # the run's model, prompts and rewards (the server's too)
    finally:
        if server is not None:
            server.close()
    results = json.load(open(os.path.join(out, "eval.json")))["results"]["T2"]
    assert set(results) == {"base", "final", "ema"} and set(parts) <= set(results["final"])
    first = json.loads(open(os.path.join(out, "metrics.jsonl")).readline())
    assert results["base"]["reward"] == pytest.approx(first["eval/reward"], rel=1e-5, abs=1e-6)


def test_wan_example_config_on_the_tiny_wan_model(tiny, tmp_path):
    """configs/wan_t2v.yaml (the paper's algorithm settings, Wan's 480p sampling, PickScore over frames plus temporal
    consistency) for 2 iterations on the tiny Wan model, videos of 5 frames, then `tempflow eval` and `tempflow sample`
    on the run (one GIF per video); bf16 as the config says, with Wan's fp32 modules left in fp32."""
    from PIL import Image

    path = os.path.join(CONFIGS, "wan_t2v.yaml")
    paper = TrainConfig.from_sources(path)
    assert_paper_settings(paper)
    assert paper.guidance == 5.0 and paper.dtype == "bf16"
    assert paper.max_sequence_length == 512 and (paper.height, paper.width) == (480, 832)
    assert paper.model_args == {"num_frames": 33, "flow_shift": 3.0, "negative_prompt": ""}
    assert set(paper.reward) == {"frames", "temporal-consistency"}
    out = str(tmp_path / "run")
    reward = f"reward={{frames: {{weight: 1.0, frames: [0, -1], reward: {{pickscore: {{path: {tiny['clip']}}}}}}}, " \
             "temporal-consistency: 0.2}"  # fmt: skip
    sets = [f"model={tiny['wan']}", "height=16", "width=16", "model_args={num_frames: 5, flow_shift: 3.0}",
            f"out={out}", f"prompts={tiny['txt']}", f"eval_prompts={tiny['txt']}", reward, *SIZES]  # fmt: skip
    run_cli("train", "--config", path, *[a for s in sets for a in ("--set", s)])
    check_run(out, tiny["wan"], tiny["txt"], ["frames", "temporal-consistency"])
    assert Image.open(os.path.join(out, "samples", "iteration00000.png")).size[0] > 0
    run_cli("eval", "--run", out, "--steps", "2")
    results = json.load(open(os.path.join(out, "eval.json")))["results"]["T2"]
    assert {"frames", "temporal-consistency"} <= set(results["final"])
    first = json.loads(open(os.path.join(out, "metrics.jsonl")).readline())
    assert results["base"]["reward"] == pytest.approx(first["eval/reward"], rel=1e-5, abs=1e-6)
    run_cli("sample", "--run", out, "a red fox", "--per-prompt", "2", "--steps", "2", "--out", str(tmp_path / "v.png"))
    assert Image.open(tmp_path / "v-001.gif").n_frames == 5
    from tempflow.models import load_model
    from tempflow.train.trainer import prepare

    model = load_model(tiny["wan"], height=16, width=16, dtype="bf16", num_frames=5)
    prepare(model, TrainConfig.from_sources(path, ["device=cpu"]))
    assert model.dtype == torch.bfloat16 and model.transformer.scale_shift_table.dtype == torch.float32


def test_flux2_example_config_on_the_tiny_flux2_model(tiny, tmp_path):
    """configs/flux2_dev_pickscore.yaml (the paper's algorithm settings, FLUX.2-dev's guidance embedding and prompt
    length) for 2 iterations on the tiny FLUX.2 model, then `tempflow eval` on the run."""
    path = os.path.join(CONFIGS, "flux2_dev_pickscore.yaml")
    paper = TrainConfig.from_sources(path)
    assert_paper_settings(paper)
    assert paper.guidance == 4.0 and paper.dtype == "bf16"
    assert paper.max_sequence_length == 512 and set(paper.reward) == {"pickscore"}
    folder = tiny["flux2"]
    out = str(tmp_path / "run")
    # 64 prompt tokens: the tiny tokenizer's chat template takes 26 (SIZES' 16 would cut the prompt off)
    sets = [f"model={folder}", "resolution=16", f"out={out}", f"prompts={tiny['txt']}", f"eval_prompts={tiny['txt']}",
            f"reward={{pickscore: {{weight: 1.0, path: {tiny['clip']}}}}}", *SIZES,
            "max_sequence_length=64"]  # fmt: skip
    run_cli("train", "--config", path, *[a for s in sets for a in ("--set", s)])
    check_run(out, folder, tiny["txt"], ["pickscore"])
    run_cli("eval", "--run", out, "--steps", "2")
    results = json.load(open(os.path.join(out, "eval.json")))["results"]["T2"]
    assert set(results) == {"base", "final", "ema"} and "pickscore" in results["final"]
    first = json.loads(open(os.path.join(out, "metrics.jsonl")).readline())
    assert results["base"]["reward"] == pytest.approx(first["eval/reward"], rel=1e-5, abs=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_the_workflow_by_the_cli_alone(family, tiny, tmp_path, capsys):
    """A .txt prompt file, two weighted rewards (one local, one served over loopback by `tempflow serve-reward`),
    `tempflow train`, `tempflow eval --run`, `tempflow sample --run`; then the model folder moves."""
    folder = str(tmp_path / f"tiny-{family}")
    run_cli("tiny-model", family, folder)
    server = subprocess.Popen([sys.executable, "-m", "tempflow.cli", "serve-reward", "pickscore", "--port", "0",
                               "--set", f"path={tiny['clip']}", "--quiet"], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT)  # fmt: skip
    try:
        line = server.stdout.readline()
        assert line.startswith("serving pickscore on http://127.0.0.1:"), line
        url = line.split(" on ")[1].strip()
        out = str(tmp_path / "run")
        reward = f"reward={{jpeg-compressibility: 0.1, pickscore: {{url: {url}, weight: 1.0}}}}"
        size = "16" if family == "flux" else "32"
        run_cli("train", "--set", f"model={folder}", "--set", f"resolution={size}", "--set", f"prompts={tiny['txt']}",
                "--set", f"eval_prompts={tiny['txt']}", "--set", reward, "--set", f"out={out}",
                *[a for s in SIZES for a in ("--set", s)])  # fmt: skip
        check_run(out, folder, tiny["txt"], ["jpeg-compressibility", "pickscore"])
        assert "held-out pickscore:" in capsys.readouterr().out
        run_cli("eval", "--run", out, "--steps", "2")
        assert "final" in capsys.readouterr().out
        run_cli("eval", "--run", out, "--steps", "2", "--reward", "{jpeg-compressibility: 1.0}", "--per-prompt", "1")
        assert "pickscore" not in capsys.readouterr().out  # the run's reward replaced for this evaluation
        run_cli(
            "sample", "--run", out, "a red fox", "--per-prompt", "2", "--steps", "2", "--out", str(tmp_path / "s.png")
        )
        assert os.path.getsize(tmp_path / "s.png") > 0
    finally:
        server.terminate()
        server.wait(timeout=10)
    # the run's model folder moved: a clear error naming it, and --model with the new path works
    os.rename(folder, folder + "-moved")
    assert cli.main(["sample", "--run", out, "a cat", "--steps", "1", "--out", str(tmp_path / "t.png")]) == 2
    err = capsys.readouterr().err
    assert f"was trained on model {folder!r}, which is not there any more" in err and "--model" in err
    run_cli(
        "sample", "--run", out, "--model", folder + "-moved", "a cat", "--steps", "1", "--out", str(tmp_path / "t.png")
    )


def test_bf16_on_a_diffusers_model_loaded_in_fp32(tiny, tmp_path):
    """dtype=bf16 casts the denoiser of a model loaded in fp32 (inputs follow it); LoRA weights stay fp32."""
    from tempflow.models import load_model
    from tempflow.train.trainer import train

    model = load_model(tiny["sd3"], height=32, width=32, dtype="fp32", max_sequence_length=16)
    cfg = TrainConfig.from_sources(None, [*SIZES, "dtype=bf16", f"out={tmp_path / 'bf16'}"])
    metrics = train(model, tiny["txt"], "jpeg-compressibility", cfg, log=lambda *_: None)
    assert metrics["trained_states"] > 0 and model.transformer.pos_embed.proj.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.trainable_parameters())


ZERO3 = {  # family: its size and a reward for its samples (Wan's are videos)
    "sd3": ["resolution=32", "reward=jpeg-compressibility"],
    "qwenimage": ["resolution=16", "reward=jpeg-compressibility"],
    "zimage": ["resolution=16", "reward=jpeg-compressibility"],
    "wan": ["resolution=16", "model_args={num_frames: 5}", "reward=temporal-consistency"],
    "flux2": ["resolution=16", "reward=jpeg-compressibility"],  # SIZES' 16 tokens: the chat template only
}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(ZERO3))
def test_zero3_on_two_processes_with_a_tiny_model(tiny, tmp_path, family):
    pytest.importorskip("deepspeed")
    out = tmp_path / "zero3"
    sets = [f"model={tiny[family]}", *ZERO3[family], f"prompts={tiny['txt']}", f"eval_prompts={tiny['txt']}",
            f"out={out}", "zero_stage=3", *SIZES, "prompts_per_iteration=2"]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={_free_port()}",
           "-m", "tempflow.cli", "train", *[a for s in sets for a in ("--set", s)]]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [m["iteration"] for m in lines] == [0, 1, 2] and all(m["trained_states"] > 0 for m in lines[1:])
    assert f"eval/{ZERO3[family][-1].split('=')[1]}" in lines[2]  # 3 held-out samples over 2 ranks: padded, once
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["world"] == 2 and state["iteration"] == 2
