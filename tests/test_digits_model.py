import json
import os

import pytest
import torch

pytest.importorskip("diffusers")

from tempflow import cli  # noqa: E402
from tempflow.models import digits as dg  # noqa: E402

TINY = dg.DigitsConfig(num_layers=1, attention_head_dim=8, num_attention_heads=2, text_dim=16)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return dg.DigitsModel(TINY)


def test_tokenizer():
    tok = dg.WordTokenizer(4)
    ids = tok(["a handwritten 7", "the DIGIT seven, please", ""])
    vocab = dg.VOCAB
    assert ids[0].tolist() == [vocab.index("a"), vocab.index("handwritten"), vocab.index("7"), 0]
    assert ids[1].tolist() == [vocab.index("the"), vocab.index("digit"), vocab.index("seven"), 1]  # 'please' cut
    assert ids[2].tolist() == [0, 0, 0, 0]


def test_cfg_is_one_batched_forward_of_cond_and_uncond():
    model = tiny_model()
    cond = model.encode(["a handwritten 3", "a handwritten 8"])
    x = torch.randn(4, *model.latent_shape)
    index = torch.tensor([0, 1, 1, 0])
    t = torch.tensor([0.9, 0.5, 0.2, 0.7])
    calls = []
    original = model.forward_velocity
    model.forward_velocity = lambda *a: calls.append(a[0].shape[0]) or original(*a)
    with torch.no_grad():
        v = model.velocity(x, t, cond, index, guidance=3.0)
        v_c = original(x, t, cond.select(index))
        v_u = original(x, t, cond.unconditional(4))
    assert calls == [8]  # one forward of 2B rows
    torch.testing.assert_close(v, v_u + 3.0 * (v_c - v_u), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model.velocity(x, t, cond, index, guidance=1.0), v_c, rtol=1e-5, atol=1e-6)


def test_velocity_is_differentiable_in_the_weights():
    model = tiny_model()
    cond = model.encode(["a handwritten 1"])
    v = model.velocity(torch.randn(2, *model.latent_shape), 0.5, cond, torch.zeros(2, dtype=torch.long), 2.0)
    v.square().mean().backward()
    assert all(p.grad is not None for p in model.net.transformer.parameters() if p.requires_grad)


def test_pretraining_is_reproducible_and_saves_atomically(tmp_path):
    pytest.importorskip("sklearn")
    a = dg.pretrain(steps=3, batch=8, cfg=TINY, log=lambda *_: None)
    b = dg.pretrain(steps=3, batch=8, cfg=TINY, log=lambda *_: None)
    for (ka, va), (kb, vb) in zip(a.net.state_dict().items(), b.net.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    path = str(tmp_path / "m.safetensors")
    a.save(path, steps=3)
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path))
    c = dg.DigitsModel.load(path)
    assert json.load(open(tmp_path / "m.json"))["config"]["num_layers"] == 1
    x = torch.randn(2, *c.latent_shape)
    with torch.no_grad():
        same = [m.velocity(x, 0.3, m.encode(["7"]), torch.zeros(2, dtype=torch.long)) for m in (a, c)]
    torch.testing.assert_close(same[0], same[1])


def test_samples_do_not_depend_on_the_batch():
    model = tiny_model()
    prompts = [dg.prompt_for(d) for d in range(5)]
    whole = dg.sample(model, prompts, steps=3, guidance=2.0, batch=5)
    parts = dg.sample(model, prompts, steps=3, guidance=2.0, batch=2)
    torch.testing.assert_close(whole, parts, rtol=1e-5, atol=1e-5)


def test_shipped_model_leaves_room_for_rl():
    pytest.importorskip("sklearn")
    model = dg.DigitsModel.load()
    meta = json.load(open(os.path.splitext(dg.WEIGHTS)[0] + ".json"))
    agreement = dg.prompt_agreement(model, steps=10, per_digit=20)
    assert 0.3 <= agreement <= 0.9, agreement
    recorded = meta[f"agreement_T10_g{model.default_guidance}"]
    assert 0.4 <= recorded <= 0.8


def test_sample_command_writes_a_grid(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert cli.main(["sample", "a handwritten 3", "a handwritten 5", "--per-prompt", "3", "--out", str(out)]) == 0
    from PIL import Image

    img = Image.open(out)
    assert img.size == (4 * (3 * 18 + 2), 4 * (2 * 18 + 2))
    assert "6 samples" in capsys.readouterr().out
