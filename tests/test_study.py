"""The study script's quick mode (what CI runs of bench/bench_train.py): every part runs on real training."""

import json
import os
import sys

import pytest

pytest.importorskip("peft")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))


@pytest.mark.slow
def test_study_quick_mode(tmp_path, capsys):
    import bench_train

    assert bench_train.main(["--quick", "--out", str(tmp_path)]) == 0
    lines = [json.loads(line) for line in open(tmp_path / "study.jsonl")]
    head, records = lines[0], lines[1:]
    assert head["speedups"]["rollout_speedup"] > 0 and head["budget_calls"] > 0
    names = {r["name"] for r in records}
    assert names == {"tempflow", "flow-grpo (global std)", "flow-grpo (prompt std)"}
    for name in names:
        rows = sorted((r for r in records if r["name"] == name), key=lambda r: r["fraction"])
        assert [r["fraction"] for r in rows] == [0.0, 0.25, 0.5, 0.75, 1.0]
        assert rows[-1]["calls"] >= head["budget_calls"] and rows[-1]["seconds"] > 0
        assert 0 <= rows[-1]["agreement"] <= 1 and rows[-1]["kl"] >= 0 and "agreement_T40" in rows[-1]
    table = open(tmp_path / "study_table.md").read()
    assert table.count("\n| ") >= 4 and "base model" in table
    assert os.path.getsize(tmp_path / "study_main_reward_vs_seconds.png") > 1000


@pytest.mark.parametrize("completion", ["euler", "euler:2"])
def test_budget_formula_matches_the_calls_the_trainer_makes(tmp_path, completion):
    """The budget unit (one TempFlow iteration's model calls) is what the engine and the trainer really spend."""
    import bench_train

    from tempflow.rewards import DigitCorrectness
    from tempflow.train.trainer import train
    from tests.test_trainer import tiny_config, tiny_model

    cfg = tiny_config(tmp_path, steps=4, branches=3, seeds_per_prompt=2, iterations=1, guidance=2.0,
                      completion=completion)  # fmt: skip
    model = tiny_model()
    counter = bench_train.Counted(model)
    metrics = train(model, "digits", DigitCorrectness(), cfg, log=lambda *_: None)
    untrained = cfg.seeds_per_prompt * (cfg.steps - 1) - metrics["trained_states"]  # groups with no signal
    assert counter.calls == bench_train.calls_per_tempflow_iteration(cfg) - 2 * untrained  # no evaluation asked
