"""Score rewards in another process or on another machine: a small HTTP reward server and its client.

A reward model that needs its own GPU, its own Python environment or its own dependencies (GenEval's detector,
UnifiedReward's VLM) runs behind :func:`serve` (``tempflow serve-reward``); training scores through a
:class:`RemoteReward`, which is a :class:`~tempflow.rewards.base.Reward` like any other. On the reward machine::

    tempflow serve-reward pickscore --port 18085 --set path=/models/pickscore

and in the training YAML (``url`` makes a reward part remote; the key names it in the metrics)::

    reward: {pickscore: {url: http://127.0.0.1:18085, weight: 1.0}}

Protocol (HTTP/1.0, JSON answers; any language can speak it):

* ``POST /score``, content type ``application/octet-stream``, body a safetensors blob:
  ``safetensors.torch.save({"images": uint8 (B, C, H, W)}, metadata={"prompts": json.dumps(prompts),
  "metadata": json.dumps(metadata)})`` with C = 1 or 3, pixels ``round(x * 255)`` of images ``x`` in [0, 1], one
  prompt (str) and one metadata object (dict) per image. The server scores ``pixels / 255`` and answers
  ``{"reward": [B floats], "parts": {name: [B floats], ...}}`` (the values :func:`~tempflow.rewards.base.score`
  gives). Errors answer ``{"error": "..."}``: 400 for a malformed request, 401 for a missing or wrong token, 413 for
  a body over the server's limit, 500 when the reward itself fails (the message is the reward's).
* ``GET /health`` answers ``{"ok": true, "reward": <name>}``.

Safety: the server binds 127.0.0.1 unless told otherwise (reach it from elsewhere with ``ssh -L``), and
:func:`serve_main` refuses another address without a shared token (``--token``; clients give ``token:`` or the
environment variable ``TEMPFLOW_REWARD_TOKEN``), sent as ``Authorization: Bearer <token>`` and compared in constant
time. Nothing is ever unpickled: requests are safetensors (raw tensor bytes and a JSON header) and answers are JSON,
so a request can at worst be rejected, never run code. The token is sent in clear: outside a trusted network, use
an SSH tunnel or a TLS proxy.
"""

from __future__ import annotations

import functools
import hmac
import http.client
import ipaddress
import json
import os
import signal
import socket
import socketserver
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import safetensors.torch
import torch

from .base import Reward, RewardError, checked, reward_name, score

__all__ = ["RemoteReward", "RewardServer", "serve", "serve_main", "encode_request", "decode_request", "TOKEN_ENV"]

TOKEN_ENV = "TEMPFLOW_REWARD_TOKEN"
# Direct connections only: an http_proxy setting would otherwise route the images and the token through a proxy.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def encode_request(images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict]) -> bytes:
    """The ``POST /score`` body for ``images`` (B, C, H, W): float in [0, 1] (rounded to the uint8 grid here) or
    already uint8, with one prompt and one JSON-able metadata dict per image."""
    pixels = images if images.dtype == torch.uint8 else (images.detach().float().clamp(0, 1) * 255).round()
    pixels = pixels.to("cpu", torch.uint8).contiguous()
    try:
        meta = {"prompts": json.dumps(list(prompts)), "metadata": json.dumps(list(metadata))}
    except (TypeError, ValueError) as exc:
        raise ValueError(f"prompts and metadata must be JSON-serialisable to send to a reward server: {exc}") from None
    return safetensors.torch.save({"images": pixels}, metadata=meta)


def decode_request(body: bytes) -> tuple[torch.Tensor, list[str], list[dict]]:
    """``(images (B, C, H, W) float in [0, 1], prompts, metadata)`` from a ``POST /score`` body, or a ValueError
    saying what is wrong with it. Reads safetensors only: nothing in the body is ever executed."""
    try:
        tensors = safetensors.torch.load(body)
        header = json.loads(body[8 : 8 + int.from_bytes(body[:8], "little")])
    except Exception as exc:  # safetensors' own error type varies between versions
        raise ValueError(
            f"the body is not a safetensors blob ({exc}); send safetensors.torch.save({{'images': uint8 "
            "(B, C, H, W)}, metadata={'prompts': json list, 'metadata': json list})"
        ) from None
    images = tensors.get("images")
    if images is None:
        raise ValueError(f"no 'images' tensor in the body (it holds {sorted(tensors)})")
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0:
        raise ValueError(
            f"images must be uint8 (B, C, H, W) with B >= 1 and C = 1 or 3, got {images.dtype} {tuple(images.shape)}"
        )
    b = images.shape[0]
    meta = header.get("__metadata__") or {}
    prompts, metadata = _json_list(meta, "prompts", b), _json_list(meta, "metadata", b)
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a JSON list of strings")
    if not all(isinstance(m, dict) for m in metadata):
        raise ValueError("metadata must be a JSON list of objects (one dict per image)")
    return images.float() / 255, prompts, metadata


def _json_list(meta: dict, key: str, b: int) -> list:
    if key not in meta:
        raise ValueError(f"no {key!r} in the safetensors metadata: send a JSON list of {b} (one per image)")
    try:
        value = json.loads(meta[key])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{key} is not valid JSON: {exc}") from None
    if not isinstance(value, list) or len(value) != b:
        got = f"a list of {len(value)}" if isinstance(value, list) else type(value).__name__
        raise ValueError(f"{key} must be a JSON list of {b} (one per image), got {got}")
    return value


# ---------------------------------------------------------------------------------------------------- the server


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, reward, token: str | None, max_bytes: int, verbose: bool):
        self.reward, self.reward_name = reward, reward_name(reward)
        self.token, self.max_bytes, self.verbose = token, max_bytes, verbose
        self.lock = threading.Lock()  # one reward model, many connection threads: score one request at a time
        super().__init__(address, _Handler)

    def server_bind(self):  # HTTPServer's looks up the host's full name, which can stall on a machine without DNS
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def handle_error(self, request, client_address):  # one line (when verbose), not a traceback per dropped client
        if self.verbose:
            exc = sys.exc_info()[1]
            print(f"{client_address[0]}: {type(exc).__name__}: {exc}", file=sys.stderr)


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    server_version = "tempflow-reward/1"
    timeout = 300  # seconds of silence from a client before its connection is dropped

    def log_message(self, fmt, *args):
        if self.server.verbose:
            super().log_message(fmt, *args)

    def log_request(self, code="-", size="-"):  # one line per request, with the error answered if any
        error = getattr(self, "_error", None)
        self.log_message('"%s" %s%s', self.requestline, code, f" {error}" if error else "")

    def do_GET(self):
        if self._authorised():
            if urllib.parse.urlsplit(self.path).path != "/health":
                return self._reply(404, {"error": f"no {self.path}: use GET /health or POST /score"})
            self._reply(200, {"ok": True, "reward": self.server.reward_name})

    def do_POST(self):
        self._unread = self._content_length()
        if not self._authorised():
            return
        if urllib.parse.urlsplit(self.path).path != "/score":
            return self._reply(404, {"error": f"no {self.path}: use GET /health or POST /score"})
        n = self._unread
        if n is None:
            return self._reply(411, {"error": "Content-Length missing or invalid: send the body with its length"})
        if n > self.server.max_bytes:
            error = f"request of {n} bytes is over this server's limit of {self.server.max_bytes} bytes"
            return self._reply(413, {"error": error})
        body, self._unread = self.rfile.read(n), 0
        if len(body) != n:
            return self._reply(400, {"error": f"the body ended after {len(body)} of {n} bytes"})
        try:
            images, prompts, metadata = decode_request(body)
        except ValueError as exc:
            return self._reply(400, {"error": str(exc)})
        try:
            with self.server.lock:
                total, parts = score(self.server.reward, images, prompts, metadata)
            answer = {"reward": total.tolist(), "parts": {k: v.tolist() for k, v in parts.items()}}
        except Exception as exc:  # the reward's failure is the client's answer; the server goes on
            name = self.server.reward_name
            return self._reply(500, {"error": f"reward {name!r} failed: {type(exc).__name__}: {exc}"})
        self._reply(200, answer)

    def _content_length(self) -> int | None:
        try:
            n = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return None
        return n if n >= 0 else None

    def _authorised(self) -> bool:
        token = self.server.token
        if token is None:
            return True
        given = self.headers.get("Authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return True
        self._reply(401, {"error": "missing or wrong token (send 'Authorization: Bearer <token>')"})
        return False

    def _reply(self, status: int, answer: dict) -> None:
        unread = getattr(self, "_unread", None)
        # Read and drop a body not read yet, 1 MiB at a time: closing the connection on unread data would break the
        # client's upload (a broken pipe) before it sees this answer.
        while unread and (chunk := self.rfile.read(min(unread, 2**20))):
            unread -= len(chunk)
        body = json.dumps(answer, allow_nan=False).encode()
        self._error = answer.get("error")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class RewardServer:
    """A reward server running in a daemon thread (:func:`serve`): ``url``, ``port``, ``close()``; a context
    manager that closes on exit."""

    def __init__(self, httpd: _HTTPServer):
        self.httpd = httpd
        host, self.port = httpd.server_address[:2]
        self.url = f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"
        # polling every 0.1 s (not 0.5 s) for shutdown makes close() quick
        loop = functools.partial(httpd.serve_forever, poll_interval=0.1)
        self._thread = threading.Thread(target=loop, name=f"reward-server:{self.port}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._thread.is_alive():
            self.httpd.shutdown()
            self._thread.join()
        self.httpd.server_close()

    def __enter__(self) -> RewardServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RewardServer({self.httpd.reward_name!r} on {self.url})"


def serve(
    reward, host: str = "127.0.0.1", port: int = 0, token: str | None = None, max_bytes: int = 2**31, verbose=False
) -> RewardServer:
    """Serve ``reward`` (a :class:`Reward` or any ``fn(images, prompts, metadata) -> (B,)``) over HTTP (protocol in
    the module docstring) from a daemon thread; port 0 takes a free port (``.port``, ``.url`` give the real one).
    With ``token``, every request must carry ``Authorization: Bearer <token>``. ``verbose`` logs one line per
    request to stderr."""
    if not callable(reward):
        raise TypeError(f"{reward!r} is not a reward (callable images, prompts, metadata -> (B,))")
    cls = _HTTPServer6 if ":" in host else _HTTPServer
    return RewardServer(cls((host, port), reward, token or None, max_bytes, verbose))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve_main(
    spec: str,
    host: str = "127.0.0.1",
    port: int = 18085,
    token: str | None = None,
    device: str = "cpu",
    kwargs: dict | None = None,
    allow_open: bool = False,
    verbose: bool = True,
) -> int:
    """``tempflow serve-reward``: build reward ``spec`` (a registered name or ``module:function``/``module:Class``
    with keyword arguments ``kwargs``) on ``device``, serve it, print ``serving <name> on <url>`` and block until
    Ctrl-C or SIGTERM. ``token`` falls back to ``TEMPFLOW_REWARD_TOKEN``. Refuses an address other than loopback
    without a token unless ``allow_open``."""
    from .registry import build_reward

    token = token or os.environ.get(TOKEN_ENV) or None
    if not _is_loopback(host):
        if token is None and not allow_open:
            raise ValueError(
                f"refusing to serve on {host} without a token: anyone who can reach port {port} could use this reward "
                f"server. Give a token (--token, or {TOKEN_ENV}; clients set `token:` or the same variable), or keep "
                "the default 127.0.0.1 and reach it through `ssh -L`"
            )
        risk = (
            "requests need the token, but plain HTTP carries it in clear: use a trusted network or an SSH tunnel"
            if token
            else "no token, so anyone who can reach this port can use the reward server: give --token"
        )
        print(f"warning: serving on {host}:{port}: {risk}", file=sys.stderr)
    reward = build_reward({spec: {"weight": 1.0, **kwargs}} if kwargs else spec, device=device)
    server = serve(reward, host, port, token, verbose=verbose)
    print(f"serving {reward_name(reward)} on {server.url}", flush=True)
    stop = threading.Event()
    main_thread = threading.current_thread() is threading.main_thread()  # only it may set signal handlers
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set()) if main_thread else None
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        if main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    return 0


# ---------------------------------------------------------------------------------------------------- the client


class RemoteReward(Reward):
    """A reward scored by a reward server at ``url`` (:func:`serve`, ``tempflow serve-reward``), ``batch_size``
    images per request. Connection errors, timeouts and 5xx answers are retried ``retries`` more times after
    ``backoff``, 2 ``backoff``, 4 ``backoff``... seconds; a 4xx answer fails at once. ``token`` (else the
    environment variable ``TEMPFLOW_REWARD_TOKEN``) is sent as ``Authorization: Bearer <token>``. Failures raise a
    :class:`RewardError` naming the reward, the server and what to do."""

    def __init__(
        self,
        url: str,
        name: str = "remote",
        token: str | None = None,
        timeout: float = 120.0,
        retries: int = 3,
        batch_size: int = 64,
        backoff: float = 0.5,
        device=None,
    ):
        super().__init__(device)  # None: images are quantised where they are, only uint8 pixels move
        self.name, self.url = name, _check_url(url, name)
        self.token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        if not timeout > 0 or batch_size < 1 or retries < 0 or backoff < 0:
            raise ValueError(
                f"reward {name!r}: need timeout > 0, batch_size >= 1, retries >= 0 and backoff >= 0, got "
                f"timeout={timeout}, batch_size={batch_size}, retries={retries}, backoff={backoff}"
            )
        self.timeout, self.retries, self.batch_size, self.backoff = float(timeout), int(retries), batch_size, backoff

    def __repr__(self) -> str:
        return f"RemoteReward({self.url!r}, name={self.name!r})"

    def score(self, images, prompts, metadata) -> torch.Tensor:
        return self._remote(images, prompts, metadata)[0]

    @torch.no_grad()
    def detailed(self, images, prompts, metadata=None):
        """``(reward (B,), {name: reward, name/part: values (B,) ...})``: the server's parts, when it reports more
        than one, prefixed with this reward's name."""
        total, parts = self._remote(*self.inputs(images, prompts, metadata))
        total = checked(self.name, total, images.shape[0]).to(images.device)
        named = {self.name: total}
        if len(parts) > 1:
            named.update({f"{self.name}/{k}": v for k, v in parts.items()})
        return total, named

    def health(self) -> dict:
        """The server's ``GET /health`` answer, ``{"ok": true, "reward": <name>}``."""
        return self._request("/health")

    def _remote(self, images, prompts, metadata) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        b = images.shape[0]
        if len(metadata) != b:
            raise ValueError(f"reward {self.name!r}: {len(metadata)} metadata for {b} images")
        pixels = (images.detach().float().clamp(0, 1) * 255).round().to("cpu", torch.uint8)
        totals, parts = [], {}
        for i in range(0, b, self.batch_size):
            j = min(i + self.batch_size, b)
            answer = self._request("/score", encode_request(pixels[i:j], prompts[i:j], metadata[i:j]))
            total, chunk_parts = self._parse(answer, j - i)
            if i and set(chunk_parts) != set(parts):
                raise RewardError(f"reward {self.name!r}: the server at {self.url} changed its parts between batches")
            totals.append(total)
            for k, v in chunk_parts.items():
                parts.setdefault(k, []).append(v)
        total = torch.cat(totals) if totals else torch.zeros(0)
        return total.to(images.device), {k: torch.cat(v).to(images.device) for k, v in parts.items()}

    def _parse(self, answer, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        try:
            values = answer["reward"]
            parts = answer.get("parts") or {}
            if len(values) != n or any(len(v) != n for v in parts.values()):
                raise ValueError(f"expected {n} values")
            return torch.tensor(values, dtype=torch.float32), {
                str(k): torch.tensor(v, dtype=torch.float32) for k, v in parts.items()
            }
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise RewardError(
                f"reward {self.name!r}: the server at {self.url} answered {str(answer)[:200]!r}, not "
                f'{{"reward": [{n} numbers], "parts": {{...}}}} ({exc}); is it a tempflow reward server?'
            ) from None

    def _request(self, path: str, body: bytes | None = None) -> dict:
        """The JSON answer to ``GET path`` (no body) or ``POST path``, retried as the class docstring says."""
        headers = {"Content-Type": "application/octet-stream"} if body is not None else {}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.url + path, data=body, headers=headers)
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                with _OPENER.open(request, timeout=self.timeout) as response:
                    text = response.read()
            except urllib.error.HTTPError as exc:
                cause, hint = f"HTTP {exc.code}: {_error_text(exc)}", _HINTS.get(exc.code, "see the server's log")
                if exc.code < 500:
                    raise RewardError(self._failure(cause, hint)) from None
            except (urllib.error.URLError, OSError) as exc:  # refused, unreachable, timed out, connection dropped
                cause, hint = self._describe(exc)
            except http.client.HTTPException as exc:  # a dropped or garbled answer
                cause, hint = f"{type(exc).__name__}: {exc}", "see the server's log"
            else:
                try:
                    return json.loads(text)
                except ValueError:
                    raise RewardError(
                        self._failure(f"the answer is not JSON ({text[:100]!r})", "is it a tempflow reward server?")
                    ) from None
        tries = f" (tried {self.retries + 1} times)" if self.retries else ""
        raise RewardError(self._failure(cause + tries, hint))

    def _failure(self, cause: str, hint: str) -> str:
        return f"reward {self.name!r} at {self.url}: {cause}; {hint}"

    def _describe(self, exc: BaseException) -> tuple[str, str]:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        if isinstance(reason, TimeoutError) or "timed out" in str(reason):
            return f"timed out after {self.timeout:g} s", "the server is slow or stuck: raise timeout, lower batch_size"
        running = "is `tempflow serve-reward` running there, on that port?"
        if isinstance(reason, ConnectionRefusedError):
            return "connection refused", running
        if isinstance(reason, socket.gaierror):
            return f"cannot resolve the host ({reason})", "check the url's host name"
        return f"{type(reason).__name__}: {reason}" if isinstance(reason, BaseException) else str(reason), running


_HINTS = {
    401: f"give the server's token (`token:` in the reward setting, or {TOKEN_ENV})",
    404: "is the url a tempflow reward server (`tempflow serve-reward`)?",
    411: "the request had no Content-Length",
    413: "lower batch_size",
    400: "the server rejected the request: are client and server the same tempflow version?",
}


def _error_text(exc: urllib.error.HTTPError) -> str:
    """The ``error`` of a JSON error answer, else the start of its text."""
    try:
        text = exc.read().decode("utf-8", "replace")
    except OSError:
        return exc.reason or "no answer body"
    try:
        return str(json.loads(text)["error"])
    except (ValueError, KeyError, TypeError):
        return text.strip()[:200] or str(exc.reason)


def _check_url(url: str, name: str) -> str:
    """``url`` without a trailing slash, or a ValueError saying what a reward server url looks like."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 (raises on a bad port)
    except (ValueError, AttributeError, TypeError) as exc:
        raise ValueError(f"reward {name!r}: bad url {url!r} ({exc}); write e.g. http://127.0.0.1:18085") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"reward {name!r}: url {url!r} needs http:// or https:// and a host, e.g. http://127.0.0.1:18085"
        )
    return url.rstrip("/")
