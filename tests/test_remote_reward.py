"""The remote reward head against small scoring servers on 127.0.0.1.

Each server is a ThreadingHTTPServer in a daemon thread that shuts itself down after
``LIFETIME`` seconds (and when its test ends). Its judge is a real computation on the decoded PNG
(mean brightness), so the expected scores are computed here from the images, independently of
the head's code.
"""

from __future__ import annotations

import base64
import io
import json
import math
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

from diffpo.rewards import REWARDS, load
from diffpo.rewards.remote import RemoteRewardError

LIFETIME = 30.0  # seconds: a server never outlives a stuck test by more than this


def brightness(b64: str) -> float:
    array = np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.float64)
    return float(array.mean() / 255)


def expected_brightness(images: torch.Tensor) -> torch.Tensor:
    """The mean of the 8-bit images, computed by hand."""
    return ((images.clamp(0, 1) * 255).round() / 255).mean(dim=(1, 2, 3))


class Judge:
    """A scripted server: ``behaviour(count, payload)`` returns (status, body bytes, delay s) or None
    for the normal answer; counts requests and the most in flight at once."""

    def __init__(self, behaviour=None):
        self.behaviour = behaviour
        self.lock = threading.Lock()
        self.count = self.in_flight = self.max_in_flight = 0
        self.headers: list[dict] = []
        self.payloads: list[dict] = []

    def answer(self, payload: dict) -> dict:
        if "messages" in payload:
            content = payload["messages"][0]["content"]
            image = content[0]["image_url"]["url"].split(",", 1)[1]
            value = brightness(image)
            if payload.get("logprobs"):
                top = [{"token": "Yes", "logprob": math.log(value)}, {"token": " no", "logprob": math.log(1 - value)},
                       {"token": "maybe", "logprob": -9.0}]
                return {"choices": [{"message": {"content": "Yes"}, "logprobs": {"content": [{"token": "Yes", "top_logprobs": top}]}}]}
            return {"choices": [{"message": {"role": "assistant", "content": f"Score: {10 * value:.6f} out of 10"}}]}
        # plain JSON protocol: brightness + the prompt's length, so a shuffled prompt would show
        return {"scores": [brightness(im) + len(p) for im, p in zip(payload["images"], payload["prompts"])]}


@contextmanager
def judge_server(judge: Judge):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep test output clean
            pass

        def do_POST(self):
            payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with judge.lock:
                judge.count += 1
                count = judge.count
                judge.in_flight += 1
                judge.max_in_flight = max(judge.max_in_flight, judge.in_flight)
                judge.headers.append(dict(self.headers))
                judge.payloads.append(payload)
            answering = True
            try:
                scripted = judge.behaviour(count, payload) if judge.behaviour else None
                status, body, delay = scripted or (200, json.dumps(judge.answer(payload)).encode(), 0.05)
                time.sleep(delay)
                # in flight until the answer starts: once the client has read it, its next request
                # may reach another handler thread before this one returns
                with judge.lock:
                    judge.in_flight -= 1
                answering = False
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                pass
            finally:
                if answering:
                    with judge.lock:
                        judge.in_flight -= 1

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    stopper = threading.Timer(LIFETIME, server.shutdown)
    stopper.daemon = True
    thread.start()
    stopper.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        stopper.cancel()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def images_and_prompts(n=5, size=16, seed=0):
    images = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return images, [f"prompt {'x' * i}" for i in range(n)]


def test_chat_pointwise_scores_parse_the_reply_in_order_with_the_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", "s3cret")
    judge = Judge()
    images, prompts = images_and_prompts(5)
    with judge_server(judge) as url:
        head = load("remote", url=f"{url}/v1", model="judge-vlm", api_key_env="TEST_JUDGE_KEY", concurrency=3)
        scores = head(images, prompts)
    assert scores.shape == (5,) and scores.dtype == torch.float32
    assert torch.allclose(scores, 10 * expected_brightness(images), atol=1e-4)
    assert judge.count == 5 and all(h["Authorization"] == "Bearer s3cret" for h in judge.headers)
    texts = sorted(p["messages"][0]["content"][1]["text"] for p in judge.payloads)
    assert all(f'"{prompt}"' in text for prompt, text in zip(sorted(prompts), texts))
    assert {p["model"] for p in judge.payloads} == {"judge-vlm"} and judge.payloads[0]["temperature"] == 0.0


def test_chat_yes_no_is_the_normalised_yes_probability():
    judge = Judge()
    images, prompts = images_and_prompts(3, seed=1)
    with judge_server(judge) as url:
        scores = load("remote", url=f"{url}/v1/chat/completions", model="m", mode="yes-no",
                      prompt="Is this {prompt}? yes or no")(images, prompts)
    # the server put p on "Yes" and 1 - p on " no" (plus a stray token): p / (p + 1 - p) = p
    assert torch.allclose(scores, expected_brightness(images), atol=1e-5)
    assert all(p["max_tokens"] == 1 and p["logprobs"] is True for p in judge.payloads)


def test_json_protocol_batches_and_does_not_depend_on_batch_size():
    judge = Judge()
    images, prompts = images_and_prompts(7, seed=2)
    expected = expected_brightness(images) + torch.tensor([len(p) for p in prompts], dtype=torch.float32)
    with judge_server(judge) as url:
        three = load("remote", url=url, protocol="json", batch_size=3)(images, prompts)
        assert judge.count == 3  # 3 + 3 + 1
        one = load("remote", url=url, protocol="json", batch_size=1)(images, prompts)
    assert torch.allclose(three, expected, atol=1e-5) and torch.allclose(one, three, atol=1e-6)


def test_videos_are_the_mean_of_their_frames():
    judge = Judge()
    videos = torch.rand(2, 3, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    with judge_server(judge) as url:
        scores = load("remote", url=url, protocol="json", batch_size=4)(videos, ["a", "b"])
    per_frame = expected_brightness(videos.flatten(0, 1)).view(2, 3) + 1
    assert torch.allclose(scores, per_frame.mean(1), atol=1e-5)


def test_at_most_concurrency_requests_are_in_flight():
    judge = Judge(lambda count, payload: (200, json.dumps(judge.answer(payload)).encode(), 0.15))
    images, prompts = images_and_prompts(6, seed=4)
    with judge_server(judge) as url:
        load("remote", url=url, model="m", concurrency=2)(images, prompts)
    assert judge.count == 6 and judge.max_in_flight == 2


def test_a_500_is_retried_alone_and_no_score_is_lost():
    # the 2nd and 3rd requests fail: each is retried on its own, the other answers are kept
    judge = Judge(lambda count, payload: (500, b'{"error": "overloaded"}', 0.0) if count in (2, 3) else None)
    images, prompts = images_and_prompts(4, seed=5)
    with judge_server(judge) as url:
        scores = load("remote", url=url, model="m", concurrency=1, backoff=0.01)(images, prompts)
    assert judge.count == 6
    assert torch.allclose(scores, 10 * expected_brightness(images), atol=1e-4)


def test_a_persistent_500_fails_with_one_line_naming_the_endpoint():
    judge = Judge(lambda count, payload: (500, b"internal error\ntraceback...", 0.0))
    images, prompts = images_and_prompts(1)
    with judge_server(judge) as url:
        with pytest.raises(RemoteRewardError) as raised:
            load("remote", url=url, model="m", retries=2, backoff=0.01)(images, prompts)
    message = str(raised.value)
    assert f"{url}/chat/completions answered HTTP 500" in message and "3 tries" in message and "\n" not in message
    assert judge.count == 3


def test_timeouts_are_retried_then_reported():
    slow_first = Judge(lambda count, payload: (200, json.dumps(slow_first.answer(payload)).encode(), 1.0) if count == 1 else None)
    images, prompts = images_and_prompts(1, seed=6)
    with judge_server(slow_first) as url:
        score = load("remote", url=url, model="m", timeout=0.3, retries=1, backoff=0.0)(images, prompts)
    assert torch.allclose(score, 10 * expected_brightness(images), atol=1e-4) and slow_first.count == 2
    always_slow = Judge(lambda count, payload: (200, b"{}", 1.0))
    with judge_server(always_slow) as url:
        start = time.perf_counter()
        with pytest.raises(RemoteRewardError, match=r"did not answer within timeout=0\.2 s \(1 try\)"):
            load("remote", url=url, model="m", timeout=0.2, retries=0)(images, prompts)
        assert time.perf_counter() - start < 1.0


def test_malformed_and_incomplete_replies_fail_clearly():
    images, prompts = images_and_prompts(2, seed=7)
    cases = [
        (lambda c, p: (200, b'{"choices": [', 0.0), {"model": "m"}, r"answered malformed JSON: '\{\"choices\": \['"),
        (lambda c, p: (200, b'{"choices": [{"message": {"content": "lovely"}}]}', 0.0), {"model": "m"},
         r"replied 'lovely', which has no score matching"),
        (lambda c, p: (200, b'{"choices": []}', 0.0), {"model": "m"}, r"replied without choices\[0\]\.message\.content"),
        (lambda c, p: (200, b'{"choices": [{"message": {"content": "1"}}]}', 0.0), {"model": "m", "mode": "yes-no"},
         r"without choices\[0\]\.logprobs.*does the server support logprobs"),
        (lambda c, p: (200, b'{"scores": [1.0]}', 0.0), {"protocol": "json"}, r"answered 1 scores for 2 images"),
        (lambda c, p: (200, b'[1, 2]', 0.0), {"protocol": "json"}, r"answered no 'scores' list"),
    ]
    for behaviour, options, pattern in cases:
        judge = Judge(behaviour)
        with judge_server(judge) as url:
            with pytest.raises(RemoteRewardError, match=pattern) as raised:
                load("remote", url=url, retries=0, **options)(images, prompts)
        assert url in str(raised.value) and "\n" not in str(raised.value)


def test_an_unreachable_endpoint_fails_fast_with_one_line():
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    images, prompts = images_and_prompts(2)
    with pytest.raises(RemoteRewardError) as raised:
        load("remote", url=f"http://127.0.0.1:{port}/v1", model="m", retries=1, backoff=0.0)(images, prompts)
    message = str(raised.value)
    assert f"http://127.0.0.1:{port}/v1/chat/completions is unreachable" in message
    assert "start the server" in message and "\n" not in message


def test_configuration_errors_are_one_line(monkeypatch):
    assert "remote" in REWARDS and not REWARDS["remote"].differentiable
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    for options, pattern in [
        ({}, "remote needs url="),
        ({"url": "http://x/v1", "api_key": "abc", "model": "m"}, "never read from a config"),
        ({"url": "http://x/v1", "model": "m", "api_key_env": "NO_SUCH_KEY_VAR"}, r"\$NO_SUCH_KEY_VAR is empty"),
        ({"url": "http://x/v1"}, "needs model="),
        ({"url": "http://x", "protocol": "grpc"}, "protocol='grpc' is unknown"),
        ({"url": "http://x/v1", "model": "m", "prompt": "rate it"}, r"must contain \{prompt\}"),
        ({"url": "http://x/v1", "model": "m", "temperature": 1}, "has no option 'temperature'"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            load("remote", **options)
    with pytest.raises(ValueError, match="has no weights"):
        load("remote", path="x.pt", url="http://x/v1", model="m")
    head = load("remote", url="http://x/v1", model="m")
    with pytest.raises(ValueError, match="not differentiable"):
        head.score_differentiable(torch.rand(1, 3, 8, 8), ["x"])
