"""Prompt sources (.txt, .jsonl with metadata, digits) and the seeded epoch sampler of the trainer."""

import json

import pytest
import torch

from tempflow.prompts import PromptSource, digits_prompts, load_prompts


def test_txt_and_jsonl_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a red fox\n\n  a blue bird  \na cat\n")
    src = load_prompts(str(txt))
    assert src.prompts == ["a red fox", "a blue bird", "a cat"] and src.metadata == [{}, {}, {}]
    jsonl = tmp_path / "p.jsonl"
    rows = [{"prompt": "two cats", "tag": "counting", "include": [{"class": "cat", "count": 2}]},
            {"prompt": "a red apple", "tag": "color_attr", "exclude": []}]  # fmt: skip
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    src = load_prompts(str(jsonl))
    assert src.prompts == ["two cats", "a red apple"]
    assert src.metadata[0] == {"tag": "counting", "include": [{"class": "cat", "count": 2}]}
    digits = digits_prompts()
    assert len(digits) == 10 and digits.prompts[3] == "a handwritten 3" and digits.metadata[3] == {"digit": 3}


def test_bad_prompt_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="prompt file .*missing.txt' not found"):
        load_prompts(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="holds no prompts"):
        load_prompts(str(tmp_path / "empty.txt"))
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"prompt": "broken"\n')
    with pytest.raises(ValueError, match="bad.jsonl, line 2: not valid JSON"):
        load_prompts(str(tmp_path / "bad.jsonl"))
    (tmp_path / "nokey.jsonl").write_text('{"prompt": "ok"}\n\n{"text": "no prompt key"}\n')
    with pytest.raises(ValueError, match="line 3: each line must be a JSON object with a non-empty string 'prompt'"):
        load_prompts(str(tmp_path / "nokey.jsonl"))
    (tmp_path / "p.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="use .txt .* or .jsonl"):
        load_prompts(str(tmp_path / "p.csv"))
    with pytest.raises(ValueError, match="non-empty strings"):
        load_prompts(["a cat", " "])


@pytest.mark.parametrize("per_iteration", [1, 3, 4, 7, 11])  # 11: more than the file holds, all used
def test_the_sampler_goes_through_epochs_without_replacement(per_iteration):
    src = PromptSource([f"prompt {i}" for i in range(7)])
    drawn, ids = [], []
    for it in range(14):  # 14 * per_iteration draws = 2 * per_iteration whole epochs
        texts, meta, pid = src.draw(it, per_iteration, seed=3)
        assert len(texts) == len(meta) == per_iteration
        drawn += texts
        ids += pid.tolist()
    assert ids == list(range(14 * per_iteration))  # unique ids: fresh noise for every draw
    for epoch in range(0, len(drawn), 7):
        assert sorted(drawn[epoch : epoch + 7]) == sorted(src.prompts)  # each epoch: every prompt exactly once
    again = [t for it in range(14) for t in src.draw(it, per_iteration, seed=3)[0]]
    assert again == drawn  # a pure function of (seed, iteration): a resumed run sees the same prompts
    other = [t for it in range(14) for t in src.draw(it, per_iteration, seed=4)[0]]
    assert other != drawn


def test_ranks_take_whole_prompts_of_the_same_draw():
    src = PromptSource([f"p{i}" for i in range(5)], [{"i": i} for i in range(5)])
    texts, meta, ids = src.draw(2, 4, seed=0)
    shards = [(texts[r::2], ids[r::2]) for r in range(2)]
    assert sorted(shards[0][0] + shards[1][0]) == sorted(texts)
    assert torch.equal(torch.cat([shards[0][1], shards[1][1]]).sort().values, ids)
    assert [m["i"] for m in meta] == [int(t[1:]) for t in texts]  # metadata travels with its prompt
