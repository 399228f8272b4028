import json
import os
import pickle
import select
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import safetensors.torch
import torch

from tempflow.rewards import DigitCorrectness, JpegCompressibility, RewardError, WeightedSum
from tempflow.rewards.base import FunctionReward, score
from tempflow.rewards.registry import build_reward
from tempflow.rewards.remote import TOKEN_ENV, RemoteReward, encode_request, serve, serve_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _no_token_in_env(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)


@pytest.fixture(scope="module")
def digits():
    return DigitCorrectness()


def grid_images(b: int, c: int = 1) -> torch.Tensor:
    """Images on the uint8 grid, so that the server sees exactly what a local reward sees."""
    return (torch.rand(b, c, 16, 16) * 255).round() / 255


def digit_prompts(b: int) -> list[str]:
    return [f"a handwritten {i % 10}" for i in range(b)]


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: bytes, headers=None) -> tuple[int, dict]:
    """(status, JSON answer) of a hand-made POST."""
    request = urllib.request.Request(url, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_remote_equals_local_with_parts_and_batches(digits):
    x, prompts = grid_images(10), digit_prompts(10)
    local, local_parts = score(digits, x, prompts)
    with serve(digits) as server:
        remote = RemoteReward(server.url, name="digits")
        total, parts = remote.detailed(x, prompts)
        close(total, local)
        close(remote(x, prompts), local)
        assert set(parts) == {"digits", "digits/digit-correctness", "digits/digit-agreement"}
        close(parts["digits/digit-agreement"], local_parts["digit-agreement"])
        close(parts["digits"], local)
        # three requests (4 + 4 + 2 images) give the same values
        batched, batched_parts = RemoteReward(server.url, name="digits", batch_size=4).detailed(x, prompts)
        close(batched, local)
        close(batched_parts["digits/digit-agreement"], local_parts["digit-agreement"])
        assert remote.health() == {"ok": True, "reward": "digit-correctness"}


def test_remote_weighted_sum_through_the_registry(digits):
    mix = WeightedSum({digits: 1.0, JpegCompressibility(): 0.1})
    x, prompts = grid_images(6, c=3), digit_prompts(6)
    local, local_parts = score(mix, x, prompts)
    with serve(mix) as server:
        remote = build_reward({"mix": {"url": server.url, "weight": 1.0, "batch_size": 4}})
        assert isinstance(remote, RemoteReward) and remote.name == "mix"
        total, parts = score(remote, x, prompts)
    close(total, local)
    assert set(parts) == {"mix"} | {f"mix/{k}" for k in local_parts}
    for k, v in local_parts.items():
        close(parts[f"mix/{k}"], v)


def test_one_part_reward_and_metadata_arrive_intact():
    seen = []

    def includes(images, prompts, metadata):
        seen.append((list(prompts), list(metadata)))
        return torch.tensor([float(len(m["include"])) for m in metadata])

    metadata = [
        {"tag": "counting", "include": [{"class": "cat", "count": i}] * i, "exclude": [], "note": "ünï ✓"}
        for i in range(1, 6)
    ]
    prompts = [f"{i} cats, «quoted»" for i in range(1, 6)]
    with serve(FunctionReward(includes, "includes")) as server:
        remote = RemoteReward(server.url, name="geneval", batch_size=2)
        total, parts = remote.detailed(grid_images(5), prompts, metadata)
    close(total, torch.arange(1.0, 6.0))
    assert set(parts) == {"geneval"}  # one part on the server: just the reward itself
    assert [p for chunk, _ in seen for p in chunk] == prompts
    assert [m for _, chunk in seen for m in chunk] == metadata


def test_server_down_fails_fast_naming_the_url():
    url = f"http://127.0.0.1:{free_port()}"
    start = time.perf_counter()
    with pytest.raises(RewardError, match="connection refused") as err:
        RemoteReward(url, name="down", retries=2, backoff=0)(grid_images(2), ["1", "2"])
    assert url in str(err.value) and "'down'" in str(err.value) and "serve-reward" in str(err.value)
    assert time.perf_counter() - start < 5


def test_token(digits, monkeypatch):
    x, prompts = grid_images(3), digit_prompts(3)
    with serve(digits, token="s3cret") as server:
        for token in (None, "wrong"):
            start = time.perf_counter()
            with pytest.raises(RewardError, match="HTTP 401: missing or wrong token") as err:
                RemoteReward(server.url, token=token, retries=3, backoff=5)(x, prompts)
            assert server.url in str(err.value) and TOKEN_ENV in str(err.value)
            assert time.perf_counter() - start < 2  # a 4xx is not retried (a retry would wait 5 s)
        close(RemoteReward(server.url, token="s3cret")(x, prompts), digits(x, prompts))
        monkeypatch.setenv(TOKEN_ENV, "s3cret")
        close(RemoteReward(server.url)(x, prompts), digits(x, prompts))
        assert RemoteReward(server.url).health()["ok"] is True
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(server.url + "/health", timeout=10)
        assert err.value.code == 401 and "token" in json.loads(err.value.read())["error"]
        request = urllib.request.Request(server.url + "/health", headers={"Authorization": "Bearer s3cret"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert json.loads(response.read()) == {"ok": True, "reward": "digit-correctness"}


class _Marker:
    """Unpickling this creates the file at ``path``: proof that the server ran code from the request."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_bad_payloads_are_rejected_and_the_server_goes_on(digits, tmp_path):
    x, prompts = grid_images(2), digit_prompts(2)
    marker = str(tmp_path / "unpickled")
    good = encode_request(x, prompts, [{}, {}])

    def body(images=None, **meta):
        images = (x * 255).to(torch.uint8) if images is None else images
        meta = {"prompts": json.dumps(prompts), "metadata": json.dumps([{}, {}]), **meta}
        return safetensors.torch.save({"images": images}, metadata=meta)

    cases = [
        (b"garbage", 400, "not a safetensors"),
        (pickle.dumps([torch.zeros(2, 1, 16, 16), _Marker(marker)]), 400, "not a safetensors"),
        (safetensors.torch.save({"pixels": torch.zeros(1, dtype=torch.uint8)}), 400, "no 'images'"),
        (body(images=x), 400, "uint8"),
        (body(images=torch.zeros(2, 16, 16, dtype=torch.uint8)), 400, "uint8 (B, C, H, W)"),
        (body(images=torch.zeros(2, 2, 16, 16, dtype=torch.uint8)), 400, "C = 1 or 3"),
        (body(prompts=json.dumps(["1"])), 400, "prompts must be a JSON list of 2"),
        (body(prompts="[not json"), 400, "prompts is not valid JSON"),
        (body(metadata=json.dumps({"tag": "x"})), 400, "metadata must be a JSON list of 2"),
        (body(metadata=json.dumps([1, 2])), 400, "one dict per image"),
        (safetensors.torch.save({"images": (x * 255).to(torch.uint8)}), 400, "no 'prompts'"),
    ]
    pickle.loads(pickle.dumps(_Marker(marker + "-local")))
    assert os.path.exists(marker + "-local")  # the marker works: unpickling it leaves a file
    with serve(digits, max_bytes=10_000) as server:
        for payload, status, message in cases:
            got, answer = post(server.url + "/score", payload)
            assert got == status and message in answer["error"], (message, got, answer)
        assert not os.path.exists(marker)  # the pickle was never loaded
        got, answer = post(server.url + "/score", b"x" * 10_001)
        assert got == 413 and "limit" in answer["error"]
        assert post(server.url + "/nowhere", good)[0] == 404
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(server.url + "/score", timeout=10)
        assert err.value.code == 404
        got, answer = post(server.url + "/score", good)
        assert got == 200
        close(torch.tensor(answer["reward"]), digits(x, prompts))
        with pytest.raises(RewardError, match="HTTP 404.*tempflow reward server"):
            RemoteReward(server.url + "/nowhere", retries=0)(x, prompts)


def test_a_failing_reward_is_retried_then_reported_and_the_server_goes_on():
    calls = []

    def fragile(images, prompts, metadata):
        calls.append(len(prompts))
        if "boom" in prompts:
            raise RuntimeError("the model exploded")
        return images.mean(dim=(1, 2, 3))

    x = grid_images(3)
    with serve(FunctionReward(fragile, "fragile")) as server:
        remote = RemoteReward(server.url, name="remote-fragile", retries=2, backoff=0)
        with pytest.raises(RewardError, match="HTTP 500: reward 'fragile' failed: RuntimeError: the model exploded"):
            remote(x, ["a", "boom", "c"])
        assert len(calls) == 3  # the first try and two retries
        close(remote(x, ["a", "b", "c"]), x.mean(dim=(1, 2, 3)))


def test_a_slow_server_times_out():
    def slow(images, prompts, metadata):
        time.sleep(1.0)
        return torch.zeros(images.shape[0])

    with serve(slow) as server:
        start = time.perf_counter()
        with pytest.raises(RewardError, match=r"timed out after 0.2 s \(tried 2 times\); .*raise timeout"):
            RemoteReward(server.url, timeout=0.2, retries=1, backoff=0)(grid_images(1), ["1"])
        assert time.perf_counter() - start < 0.9  # the second try timed out too, waiting for the first one's lock


def test_nan_on_the_server_names_the_reward():
    def broken(images, prompts, metadata):
        return torch.full((images.shape[0],), float("nan"))

    with serve(FunctionReward(broken, "broken")) as server:
        with pytest.raises(RewardError, match="reward 'broken' returned 2 non-finite values") as err:
            RemoteReward(server.url, name="far", retries=0)(grid_images(2), ["1", "2"])
        assert "'far'" in str(err.value) and server.url in str(err.value)


def test_a_malformed_answer_names_the_server():
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    class OneValue(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = b'{"reward": [1.0]}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), OneValue)
    Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        with pytest.raises(RewardError, match="expected 3 values") as err:
            RemoteReward(url, retries=0)(grid_images(3), ["1", "2", "3"])
        assert url in str(err.value)
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_urls_are_checked():
    for url in ("127.0.0.1:18085", "ftp://host:21", "http://", "http://host:notaport"):
        with pytest.raises(ValueError, match="url"):
            RemoteReward(url)
    assert RemoteReward("https://rewards.example:8443/").url == "https://rewards.example:8443"


def test_serve_main_refuses_an_open_host_without_a_token():
    with pytest.raises(ValueError, match="refusing to serve on 0.0.0.0 without a token"):
        serve_main("jpeg-compressibility", host="0.0.0.0", port=18085, token=None, device="cpu", kwargs={})


def test_subprocess_server():
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "tempflow.cli", "serve-reward", "jpeg-compressibility", "--port", "0"]
    cmd += ["--set", "quality=80"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        line = proc.stdout.readline() if ready else ""
        assert line.startswith("serving jpeg-compressibility on http://127.0.0.1:"), (line, proc.poll())
        url = line.split()[-1]
        x = grid_images(4, c=3)
        close(RemoteReward(url, name="jpeg", retries=0)(x, ["a"] * 4), JpegCompressibility(quality=80)(x, ["a"] * 4))
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "POST /score" in err  # one line per request
