"""The ``compile`` setting: torch.compile of the denoiser's forward (tempflow.rollout.compile_model).

The wrapper's logic (which calls go through the graph, padding, the dynamic batch dimension, recompilation counts,
weights as graph inputs) is checked with dynamo's ``eager`` backend, which traces and guards like inductor but
generates no code (seconds); one slow test compiles a tiny model with inductor inside ``tempflow train``.
"""

import dataclasses

import pytest
import torch

from tempflow.models import Conditioning, FlowModel, GaussianMixtureFlow
from tempflow.rollout import BranchPlan, RolloutConfig, compile_model, compile_stats, naive_rollout, rollout
from tempflow.train import TrainConfig

FLOW = GaussianMixtureFlow.ring(4, 2.0, 0.3)
PROMPTS = ["p0", "p1", "p2"]
SHIFT = torch.tensor([[0.0, 0.0], [1.0, -1.0], [-2.0, 0.5]])
FIELDS = ("prompt_index", "seed_index", "step", "branch", "state", "action", "old_log_prob", "reward")


class Linear(FlowModel):
    """A guided model whose forward is a small module (weights that an optimizer could change), row by row."""

    latent_shape, shift, default_guidance = (2,), 3.0, 2.0

    def __init__(self):
        self.net = torch.nn.Linear(3, 2)
        self.rows = []

    def encode(self, prompts):
        return Conditioning({"shift": SHIFT[: len(prompts)]}, {"shift": torch.zeros(1, 2)})

    def forward_velocity(self, x, t, cond):
        return FLOW.velocity(x - cond["shift"] * (1 - t[:, None]), t) + self.net(torch.cat([x, t[:, None]], 1))

    def decode(self, latents):
        return latents


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Compiled graphs live on the code objects, shared by every instance of a class: each test starts empty."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def reward(images, prompts, metadata):
    return -(images**2).sum(-1)


def same_rows(a, b, exact=True):
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        if exact:
            assert torch.equal(x, y), name
        else:
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=name)


def test_a_compiled_rollout_gives_the_eager_rows_with_one_graph():
    torch.manual_seed(0)
    eager = Linear()
    model = Linear()
    model.net.load_state_dict(eager.net.state_dict())
    compile_model(model, True, backend="eager")
    cfg = RolloutConfig(plan=BranchPlan.tempflow(5, 3), seeds_per_prompt=2, max_batch=14, backend="torch")
    stats = {}
    fast = rollout(model, PROMPTS, reward, dataclasses.replace(cfg, compile=True), stats=stats)
    same_rows(fast, rollout(eager, PROMPTS, reward, cfg))
    same_rows(fast, naive_rollout(eager, PROMPTS, reward, cfg))
    got = compile_stats(model)
    # the live items vary from 6 to 18 each tick: one graph with a dynamic batch dimension serves every size
    assert got["kind"] == "dynamic" and got["compiles"] == 1 and got["recompiles"] == 0
    assert len(got["shapes"]) > 2 and got["calls"] == stats["model_calls"] and got["padded_rows"] == 0
    assert stats["padded_samples"] == 0  # no buckets with a dynamic batch dimension


def test_static_compile_pads_to_buckets_and_compiles_one_graph_per_bucket():
    torch.manual_seed(0)
    eager, model = Linear(), Linear()
    model.net.load_state_dict(eager.net.state_dict())
    cfg = RolloutConfig(plan=BranchPlan.tempflow(5, 3), seeds_per_prompt=2, max_batch=14, backend="torch")
    compile_model(model, "static", cfg.max_batch, backend="eager")
    stats = {}
    fast = rollout(model, PROMPTS, reward, dataclasses.replace(cfg, compile="static"), stats=stats)
    same_rows(fast, rollout(eager, PROMPTS, reward, cfg))
    got = compile_stats(model)
    assert set(got["shapes"]) <= {2, 4, 8, 14} and got["compiles"] == len(got["shapes"])  # rows: buckets(14)
    assert stats["padded_samples"] > 0 and stats["largest_batch"] <= 14
    # a batch outside the engine (evaluation's last chunk, say) is padded to a bucket too: no new graph
    cond = model.encode(PROMPTS)
    with torch.no_grad():
        v = model.velocity(torch.randn(5, 2), 0.5, cond, torch.tensor([0, 1, 2, 0, 1]))
        assert v.shape == (5, 2)
    assert compile_stats(model)["compiles"] == len(compile_stats(model)["shapes"])


def test_weights_are_graph_inputs_and_the_training_forward_stays_eager():
    torch.manual_seed(0)
    model = compile_model(Linear(), True, backend="eager")
    cond = model.encode(PROMPTS)
    x, index = torch.randn(4, 2), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        before = model.velocity(x, 0.3, cond, index)
        graphs = compile_stats(model)["graphs"]
        model.net.weight.add_(1.0)  # an optimizer step, in place
        after = model.velocity(x, 0.3, cond, index)
        eager = Linear()
        eager.net.load_state_dict(model.net.state_dict())
        torch.testing.assert_close(after, eager.velocity(x, 0.3, cond, index))
        assert not torch.equal(before, after)
    assert compile_stats(model)["compiles"] == 1 and compile_stats(model)["graphs"] == graphs  # new values: no graph
    v = model.velocity(x, 0.3, cond, index)  # with gradients: eager, differentiable
    v.sum().backward()
    assert model.net.weight.grad is not None and compile_stats(model)["eager_calls"] == 1  # the CFG pair: one call
    with torch.no_grad():
        one = model.velocity(x[:1], 0.3, cond, index[:1], guidance=1.0)  # one row: padded to two
    assert one.shape == (1, 2) and compile_stats(model)["compiles"] == 1
    compile_model(model, True, backend="eager")  # again with the same settings: nothing changes
    assert compile_stats(model)["calls"] == 3


def test_lora_reference_compiles_a_second_graph_once():
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from tempflow.models import digits as dg

    torch.manual_seed(0)
    model = dg.DigitsModel(dg.DigitsConfig(num_layers=1, attention_head_dim=8, num_attention_heads=2, text_dim=16))
    model.use_lora(4, 8)
    compile_model(model, True, backend="eager")
    cond = model.encode(["a 1", "a 2"])
    x, index = torch.randn(3, 1, 16, 16), torch.tensor([0, 1, 0])
    with torch.no_grad():
        for _ in range(2):
            model.velocity(x, 0.5, cond, index)
            with model.reference():
                model.velocity(x, 0.5, cond, index)
    assert compile_stats(model)["compiles"] == 2  # adapters on, adapters off; then each graph is reused


def test_the_compile_setting():
    assert TrainConfig().compile == "false" and TrainConfig().rollout_config().compile is False
    for value, want, rollout_value in ((True, "true", True), ("on", "true", True), ("dynamic", "true", True),
                                       ("static", "static", "static"), ("no", "false", False)):  # fmt: skip
        cfg = TrainConfig(compile=value)
        assert cfg.compile == want and cfg.rollout_config().compile == rollout_value
    assert TrainConfig.from_sources(None, ["compile=true"]).compile == "true"
    from tempflow.train import SettingError

    with pytest.raises(SettingError, match="compile='max'.*false, true or static"):
        TrainConfig(compile="max")
    pytest.importorskip("peft")
    from tempflow.models import digits as dg
    from tempflow.train.trainer import prepare

    model = dg.DigitsModel(dg.DigitsConfig(num_layers=1, attention_head_dim=8, num_attention_heads=2, text_dim=16))
    with pytest.raises(ValueError, match="ZeRO-3"):
        prepare(model, TrainConfig(compile=True, zero_stage=3, lora_rank=4, lora_alpha=8))


@pytest.mark.slow
def test_train_with_compile_equals_eager_with_one_graph(tmp_path):
    """A tiny run with compile=true (inductor): the rollout and evaluation forwards go through one compiled graph
    (no recompilation over the run), and the run's metrics equal the eager run's within float tolerance."""
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    import json

    from tempflow.models import digits as dg
    from tempflow.rewards import DigitCorrectness
    from tempflow.train import train

    def tiny():
        torch.manual_seed(0)
        return dg.DigitsModel(dg.DigitsConfig(num_layers=1, attention_head_dim=8, num_attention_heads=2, text_dim=16))

    base = dict(steps=3, branches=2, seeds_per_prompt=2, prompts_per_iteration=1, iterations=2, lora_rank=4,
                lora_alpha=8, states_per_step=2, eval_steps=3, eval_per_prompt=1, max_batch=8)  # fmt: skip
    runs = {}
    for name, flag in (("eager", False), ("compiled", True)):
        model = tiny()
        cfg = TrainConfig(**base, out=str(tmp_path / name), compile=flag)
        train(model, "digits", DigitCorrectness(), cfg, eval_prompts="digits", log=lambda *_: None)
        runs[name] = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
        if flag:
            got = compile_stats(model)
            assert got["compiles"] == 1 and got["recompiles"] == 0 and got["eager_calls"] > 0  # training: eager
            assert got["calls"] > 0 and len(got["shapes"]) > 1
    for a, b in zip(runs["eager"], runs["compiled"], strict=True):
        for key in ("reward", "loss", "eval/reward"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-5), key
